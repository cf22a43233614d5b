"""How the real clients apply a LoRA file, for the strength tests: diffusers' own loader, and ComfyUI's rule; and
the LoRAs those tests write (`trained_adapter`, `per_module_lora`, with their true B·A·scale per module).

`comfyui_rule_deltas` is an independent implementation of ComfyUI's documented behaviour for Qwen-Image (written
from its rules, not from fusedit's parser): a module is found under `diffusion_model.` / `transformer.` / no prefix
/ `lora_unet_` / `lycoris_` (flattened with `_`), its factors are lora_up/lora_down or lora_B/lora_A (optionally
`.default`), its scale is `<module>.alpha` / rank when that tensor exists and 1.0 otherwise, and safetensors
metadata is never read. Keys it does not use are returned: ComfyUI logs them as "lora key not loaded".
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from fusedit.convert import LoraModule, LoraWeights
from fusedit.lora import add_lora
from fusedit.model.merged_qkv import fuse_qkv
from tests.convert_utils import HIDDEN, bf16_valued, tiny_transformer

_FACTOR_PAIRS = (
    (".lora_up.weight", ".lora_down.weight"),
    (".lora_B.weight", ".lora_A.weight"),
    (".lora_B.default.weight", ".lora_A.default.weight"),
)


def trained_adapter(rank: int, alpha: float, use_rslora: bool, merged: bool = False):
    """A tiny transformer with a PEFT adapter whose lora_B is non-zero (as after training), and its true deltas."""
    model = tiny_transformer(seed=3)
    if merged:
        fuse_qkv(model)
    add_lora(model, rank=rank, alpha=alpha, targets="attn_mlp", use_rslora=use_rslora)
    generator = torch.Generator().manual_seed(0)
    expected = {}
    for name, layer in model.named_modules():
        if hasattr(layer, "lora_A") and "default" in layer.lora_A:
            with torch.no_grad():
                layer.lora_B["default"].weight.copy_(
                    torch.randn(layer.lora_B["default"].weight.shape, generator=generator)
                )
            B, A = layer.lora_B["default"].weight, layer.lora_A["default"].weight
            expected[name] = (B.double() @ A.double()) * layer.scaling["default"]
    return model, expected


def per_module_lora() -> tuple[LoraWeights, dict[str, torch.Tensor]]:
    """musubi-style: every module its own rank and alpha (scales 0.75, 2, 1/3, 8, 1)."""
    specs = {
        "transformer_blocks.0.attn.to_q": (4, 3.0, HIDDEN),
        "transformer_blocks.0.attn.to_k": (4, 8.0, HIDDEN),
        "transformer_blocks.0.attn.to_v": (6, 2.0, HIDDEN),
        "transformer_blocks.1.img_mlp.net.0.proj": (2, 16.0, 128),
        "transformer_blocks.1.attn.to_add_out": (8, 8.0, HIDDEN),
    }
    modules = {
        m: LoraModule(bf16_valued((r, HIDDEN), i), bf16_valued((out, r), i + 50), alpha)
        for i, (m, (r, alpha, out)) in enumerate(specs.items())
    }
    lora = LoraWeights(modules)
    return lora, {m: (mod.B.double() @ mod.A.double()) * mod.scale for m, mod in modules.items()}


def linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def comfyui_rule_deltas(path: str | Path, modules: list[str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """module -> B·A·scale in float64 as ComfyUI applies it, and the keys it would not load."""
    tensors = load_file(str(path))  # metadata deliberately not read
    names = {}
    for module in modules:
        for prefix in ("diffusion_model.", "transformer.", ""):
            names[prefix + module] = module
        names["lora_unet_" + module.replace(".", "_")] = module
        names["lycoris_" + module.replace(".", "_")] = module
    deltas, used = {}, set()
    for lora_name, module in names.items():
        for up, down in _FACTOR_PAIRS:
            if lora_name + up not in tensors:
                continue
            B, A = tensors[lora_name + up], tensors[lora_name + down]
            alpha = tensors.get(lora_name + ".alpha")
            scale = alpha.item() / A.shape[0] if alpha is not None else 1.0
            deltas[module] = (B.double() @ A.double()) * scale
            used |= {lora_name + up, lora_name + down} | ({lora_name + ".alpha"} if alpha is not None else set())
            break
    return deltas, sorted(set(tensors) - used)


def diffusers_deltas(path: str | Path, transformer: nn.Module, peft: bool = False) -> dict[str, torch.Tensor]:
    """module -> B·A·scaling in float64 after diffusers' `QwenImageEditPipeline.load_lora_weights(path)`, or for
    a PEFT-format file (bare module names) `transformer.load_lora_adapter(path, prefix=None)`: the pipeline loader
    looks for `transformer.` keys only and loads nothing from such a file (it only warns)."""
    from diffusers import QwenImageEditPipeline

    if peft:
        transformer.load_lora_adapter(str(path), prefix=None, adapter_name="client", use_safetensors=True)
    else:
        pipe = QwenImageEditPipeline(
            scheduler=None, vae=None, text_encoder=None, tokenizer=None, processor=None, transformer=transformer
        )
        pipe.load_lora_weights(str(path), adapter_name="client")
    deltas = {}
    for name, layer in transformer.named_modules():
        if hasattr(layer, "lora_A") and "client" in layer.lora_A:
            B, A = layer.lora_B["client"].weight, layer.lora_A["client"].weight
            deltas[name] = (B.double() @ A.double()) * layer.scaling["client"]
    return deltas


def assert_same_deltas(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> float:
    """Same modules, same updates up to fp32 rounding of one factor; returns the max relative error."""
    assert sorted(got) == sorted(expected), f"{what}: modules differ: {sorted(set(got) ^ set(expected))[:5]}"
    worst = 0.0
    for module, delta in expected.items():
        error = (got[module] - delta).abs().max().item() / max(delta.abs().max().item(), 1e-30)
        assert error < 1e-6, f"{what}: {module} off by {error:.3g} (relative)"
        worst = max(worst, error)
    return worst
