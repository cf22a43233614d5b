"""Build the trainable transformer as an ordered list of transforms (torchtitan style).

    load -> fuse (q/k/v layout) -> fp8 (storage or float8 compute) -> LoRA -> stream -> activation checkpointing
    (+ CPU offload) -> compile

Each stage is a separate function that records itself on the model (`model._fusedit_stages`) and refuses to run
after a later stage (LoRA after compile, fp8 after LoRA, ...) or twice: quantising after LoRA would quantise the
adapters, streaming must see which tensors are frozen (LoRA exists) and sit inside the checkpoint (so the backward's
recompute copies the block in again), checkpointing must wrap the LoRA-carrying blocks, and compile must see the
final modules. New stages (fp8 storage, other compile modes) slot in by name in `STAGES`. The trainer
(fusedit.training) and the benchmark (fusedit.bench, on a random base model) build through `build_transformer`, so
both run the same model.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from fusedit.devices import to_dtype
from fusedit.lora.adapter import add_lora, lora_inputs_follow_autocast
from fusedit.model.loading import load_transformer
from fusedit.step.config import LAYOUTS, LoraSpec, ModelConfig
from fusedit.step.precision import Precision

STAGES = ("load", "fuse", "fp8", "lora", "stream", "activation_checkpointing", "compile")


def stages_applied(model: nn.Module) -> list[str]:
    return list(getattr(model, "_fusedit_stages", []))


def _enter_stage(model: nn.Module, stage: str) -> None:
    done = stages_applied(model)
    if stage in done:
        raise RuntimeError(f"model transform {stage!r} was already applied (stages so far: {done})")
    later = [other for other in done if STAGES.index(other) > STAGES.index(stage)]
    if later:
        raise RuntimeError(
            f"model transform {stage!r} must run before {later}; the build order is {' -> '.join(STAGES)}"
        )
    model._fusedit_stages = [*done, stage]


def load(path: str | Path, layout: str, dtype: str | torch.dtype | None = None) -> nn.Module:
    """The frozen transformer at `path`, already in `layout` (the loader converts while reading: no second copy)."""
    model = load_transformer(path, layout=layout, dtype=to_dtype(dtype))
    model.requires_grad_(False)
    _enter_stage(model, "load")
    _enter_stage(model, "fuse")
    return model


def adopt(model: nn.Module) -> nn.Module:
    """The `load` stage for a transformer built elsewhere (the benchmark's random base): frozen, recorded."""
    model.requires_grad_(False)
    _enter_stage(model, "load")
    return model


def fuse(model: nn.Module, layout: str) -> nn.Module:
    """Put the q/k/v projections in `layout`: `merged_qkv` fuses them (fusedit.model.merged_qkv), `standard`
    splits them; a model already in `layout` is left as it is."""
    from fusedit.model.merged_qkv import fuse_qkv, unfuse_qkv

    if layout not in LAYOUTS:  # any other word would unfuse silently (a config's layout is checked by ModelConfig)
        raise ValueError(f"layout must be one of {' | '.join(LAYOUTS)}, got {layout!r}")
    _enter_stage(model, "fuse")
    return fuse_qkv(model) if layout == "merged_qkv" else unfuse_qkv(model)


def fp8_storage(model: nn.Module, granularity: str = "row", compute_dtype: str | torch.dtype = "bfloat16") -> nn.Module:
    """Frozen block Linears stored as float8_e4m3fn, upcast per layer (fusedit.model.fp8)."""
    from fusedit.model.fp8 import apply_fp8_storage

    _enter_stage(model, "fp8")
    return apply_fp8_storage(model, granularity=granularity, compute_dtype=to_dtype(compute_dtype))


def float8_compute(
    model: nn.Module, compute_dtype: str | torch.dtype = "bfloat16", device: str | torch.device | None = None
) -> nn.Module:
    """Frozen block Linears computing in float8 (fusedit.model.fp8.apply_float8_compute), in the fp8 slot instead
    of fp8 storage. `device`: where training will run (default: CUDA when available), which must be sm89+."""
    from fusedit.model.fp8 import apply_float8_compute, float8_compute_support

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    supported, reason = float8_compute_support(device)
    if not supported:
        raise RuntimeError(f"precision.fp8=float8: {reason}. Use precision.fp8=storage instead.")
    _enter_stage(model, "fp8")
    return apply_float8_compute(model, compute_dtype=to_dtype(compute_dtype), device=device)


def lora(model: nn.Module, **lora_kwargs) -> nn.Module:
    """PEFT LoRA (fusedit.lora.adapter); under autocast the adapters read their bf16 inputs without an fp32 copy
    (fusedit.lora.adapter.lora_inputs_follow_autocast)."""
    _enter_stage(model, "lora")
    lora_kwargs["dtype"] = to_dtype(lora_kwargs.get("dtype", torch.float32))
    if lora_kwargs.get("init_from") is not None:  # a path: read (and checked) in the model's layout and names
        from fusedit.lora.adapter import model_layout, target_family
        from fusedit.lora.init_from import read_init_lora

        targets = lora_kwargs.get("targets", "attn_mlp")
        lora_kwargs["init_from"] = read_init_lora(
            lora_kwargs["init_from"], lora_kwargs["rank"], targets, model_layout(model), target_family(model)
        )
    model = add_lora(model, **lora_kwargs)
    lora_inputs_follow_autocast(model)
    return model


def stream(model: nn.Module, resident_blocks: int = 0) -> nn.Module:
    """Frozen tensors of all blocks but the last `resident_blocks` kept in (pinned) host memory and copied in per
    use, one block ahead on a side CUDA stream (fusedit.model.streaming). Needs checkpointing of every block."""
    from fusedit.model.streaming import stream_blocks

    _enter_stage(model, "stream")
    stream_blocks(model, resident_blocks)
    return model


def activation_checkpointing(model: nn.Module, every: int = 1, offload: bool = False) -> nn.Module:
    """Recompute every `every`-th transformer block in the backward pass (1 = all blocks, 0 = off); `offload` keeps
    the saved block inputs in CPU memory until backward (fusedit.model.checkpointing)."""
    from fusedit.model.checkpointing import checkpoint_blocks

    _enter_stage(model, "activation_checkpointing")  # checkpoint_blocks refuses a negative `every`, offload without it
    return checkpoint_blocks(model, every, offload)


def compile_blocks(model: nn.Module, **compile_kwargs) -> nn.Module:
    """Regional compilation: the repeated transformer block is compiled once and reused by every block."""
    _enter_stage(model, "compile")
    model.compile_repeated_blocks(**compile_kwargs)
    return model


def build_transformer(
    source: str | Path | nn.Module,
    model: ModelConfig,
    lora_spec: LoraSpec,
    precision: Precision,
    device: str | torch.device | None = None,
) -> nn.Module:
    """All stages in order, as the three configs ask for them (conf/model, conf/lora, conf/precision).

    `source`: a checkpoint to load (in `precision.base_dtype`), or a transformer already built (the benchmark's
    random base). `device`: where training will run, checked by float8 compute (default: CUDA when available).
    """
    if isinstance(source, nn.Module):
        transformer = fuse(adopt(source), model.layout)
    else:
        transformer = load(source, model.layout, precision.base_dtype)
    if precision.fp8 == "float8":
        transformer = float8_compute(transformer, precision.compute_dtype, device)
    elif precision.fp8 == "storage":
        transformer = fp8_storage(transformer, precision.fp8_granularity, precision.compute_dtype)
    transformer = lora(transformer, **dataclasses.asdict(lora_spec), dtype=precision.lora_dtype)
    if model.resident_blocks is not None:
        transformer = stream(transformer, model.resident_blocks)
    if model.activation_checkpointing:  # ModelConfig refuses checkpoint_offload without it
        transformer = activation_checkpointing(
            transformer, model.activation_checkpointing, offload=model.checkpoint_offload
        )
    if model.compile:
        transformer = compile_blocks(transformer, **(model.compile if isinstance(model.compile, dict) else {}))
    return transformer


def fsdp_wrap_policy() -> set[type[nn.Module]]:
    """FSDP auto-wrap: one unit per transformer block (trainer=fsdp)."""
    from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock

    return {QwenImageTransformerBlock}
