"""PEFT LoRA on the Qwen-Image transformer (either QKV layout), and its export as a diffusers LoRA file.

`add_lora` freezes the whole transformer and injects PEFT LoRA layers through diffusers' own
`PeftAdapterMixin.add_adapter`, so module names stay diffusers' names and the trained model is still a
`QwenImageTransformer2DModel`. The trainable set is then exactly the `lora_A`/`lora_B` weights.

`export_lora` writes `transformer.<module>.lora_A.weight` / `.lora_B.weight` (no `.default.`) with the LoraConfig
under the `lora_adapter_metadata` key, as diffusers' `save_lora_weights` does, so `load_lora_weights` rebuilds
the adapter with the trained rank *and* alpha (without that metadata diffusers assumes alpha = rank).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from torch import nn

from fusedit.io import save_safetensors_atomic
from fusedit.lora.targets import resolve_targets, translate_targets
from fusedit.model.merged_qkv import MERGED_TO_STANDARD, is_merged

INIT_CHOICES = ("default", "gaussian")
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
FUSEDIT_METADATA_KEY = "fusedit_lora"
EXPORT_LAYOUTS = ("standard", "merged_qkv")


def model_layout(transformer: nn.Module) -> str:
    return "merged_qkv" if is_merged(transformer) else "standard"


def has_lora(transformer: nn.Module) -> bool:
    return any("lora_" in name for name, _ in transformer.named_parameters())


def add_lora(
    transformer: nn.Module,
    rank: int,
    alpha: float | None = None,
    targets: str | list[str] = "attn_mlp",
    dropout: float = 0.0,
    init: str = "default",
    use_rslora: bool = False,
    dtype: torch.dtype | None = torch.float32,
) -> nn.Module:
    """Freeze `transformer` and add one LoRA adapter on `targets` (translated to the model's layout). In place."""
    if int(rank) < 1:
        raise ValueError(f"lora.rank must be >= 1, got {rank}")
    if alpha is not None and float(alpha) <= 0:
        raise ValueError(f"lora.alpha must be > 0, got {alpha}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"lora.dropout must be in [0, 1), got {dropout}")
    if init not in INIT_CHOICES:
        raise ValueError(f"lora.init must be one of {INIT_CHOICES}, got {init!r}")
    if has_lora(transformer):
        raise ValueError("the transformer already carries LoRA layers; add_lora applies once")
    transformer.requires_grad_(False)
    config = LoraConfig(
        r=int(rank),
        lora_alpha=float(alpha if alpha is not None else rank),
        lora_dropout=float(dropout),
        target_modules=resolve_targets(targets, model_layout(transformer)),
        init_lora_weights=True if init == "default" else init,
        use_rslora=bool(use_rslora),
    )
    transformer.add_adapter(config)
    for name, parameter in transformer.named_parameters():
        if "lora_" in name:
            if dtype is not None:
                parameter.data = parameter.data.to(dtype)
            parameter.requires_grad_(True)
    return transformer


def lora_parameters(transformer: nn.Module) -> dict[str, nn.Parameter]:
    """Name -> parameter for every LoRA weight (the trainable set)."""
    return {name: parameter for name, parameter in transformer.named_parameters() if "lora_" in name}


def lora_config(transformer: nn.Module) -> LoraConfig:
    configs = getattr(transformer, "peft_config", None)
    if not configs:
        raise ValueError("the transformer has no LoRA adapter (call add_lora first)")
    return next(iter(configs.values()))


def lora_state_dict(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights keyed `<module>.lora_A.weight` (PEFT's adapter-name-free keys), detached."""
    return {key: value.detach() for key, value in get_peft_model_state_dict(transformer).items()}


def _split_merged(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # A LoRA on a merged projection W = [Wq; Wk; Wv] adds B·A; its q/k/v rows are B_q·A, B_k·A, B_v·A: three LoRAs
    # of the same rank sharing A. Exact, no refactorisation.
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        module, _, role = key.rpartition(".lora_")
        parent, _, leaf = module.rpartition(".")
        if leaf not in MERGED_TO_STANDARD:
            out[key] = value
            continue
        parts = MERGED_TO_STANDARD[leaf]
        pieces = [value] * len(parts) if role.startswith("A") else value.chunk(len(parts), dim=0)
        for name, piece in zip(parts, pieces, strict=True):
            out[f"{parent}.{name}.lora_{role}"] = piece.clone()
    return out


def export_state_dict(transformer: nn.Module, layout: str = "standard") -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors in diffusers' key layout, LoraConfig dict for the exported layout)."""
    if layout not in EXPORT_LAYOUTS:
        raise ValueError(f"LoRA export layout must be one of {EXPORT_LAYOUTS}, got {layout!r}")
    source = model_layout(transformer)
    state_dict = lora_state_dict(transformer)
    if source == "merged_qkv" and layout == "standard":
        state_dict = _split_merged(state_dict)
    elif source == "standard" and layout == "merged_qkv":
        raise ValueError(
            "a LoRA trained on the standard layout is exported in the standard layout; convert it with "
            "`fusedit convert` for a merged copy"
        )
    config = lora_config(transformer).to_dict()
    config["target_modules"] = translate_targets(sorted(config["target_modules"]), layout)
    config = {key: sorted(value) if isinstance(value, set) else value for key, value in config.items()}
    tensors = {f"transformer.{key}": value.contiguous() for key, value in state_dict.items()}
    return tensors, config


def export_lora(transformer: nn.Module, path: str | os.PathLike, layout: str = "standard", **extra: str) -> Path:
    """Write the adapter to `path` (atomically) as a diffusers LoRA in `layout`; `extra` goes to the metadata."""
    tensors, config = export_state_dict(transformer, layout)
    diffusers_config = {f"transformer.{key}": value for key, value in config.items()}
    fusedit = {"layout": layout, "rank": config["r"], "alpha": config["lora_alpha"], **extra}
    metadata = {
        "format": "pt",
        DIFFUSERS_METADATA_KEY: json.dumps(diffusers_config, indent=2, sort_keys=True, default=str),
        FUSEDIT_METADATA_KEY: json.dumps(fusedit, sort_keys=True, default=str),
    }
    save_safetensors_atomic(tensors, path, metadata)
    return Path(path)
