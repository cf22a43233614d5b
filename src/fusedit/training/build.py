"""Build the trainable transformer as an ordered list of transforms (torchtitan style).

    load -> fp8 (storage or float8 compute) -> LoRA -> stream -> activation checkpointing (+ CPU offload) -> compile

Each stage is a separate function that records itself on the model (`model._fusedit_stages`) and refuses to run
after a later stage (LoRA after compile, fp8 after LoRA, ...) or twice: quantising after LoRA would quantise the
adapters, streaming must see which tensors are frozen (LoRA exists) and sit inside the checkpoint (so the backward's
recompute copies the block in again), checkpointing must wrap the LoRA-carrying blocks, and compile must see the
final modules. New stages (fp8 storage, other compile modes) slot in by name in `STAGES`.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fusedit.devices import to_dtype
from fusedit.lora.adapter import add_lora
from fusedit.model.loading import load_transformer

STAGES = ("load", "fp8", "lora", "stream", "activation_checkpointing", "compile")


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
    model = load_transformer(path, layout=layout, dtype=to_dtype(dtype))
    model.requires_grad_(False)
    _enter_stage(model, "load")
    return model


def fp8_storage(model: nn.Module, granularity: str = "row", compute_dtype: str | torch.dtype = "bfloat16") -> nn.Module:
    """Frozen block Linears stored as float8_e4m3fn, upcast per layer (fusedit.model.fp8)."""
    from fusedit.model.fp8 import apply_fp8_storage

    _enter_stage(model, "fp8")
    return apply_fp8_storage(model, granularity=granularity, compute_dtype=to_dtype(compute_dtype))


def float8_compute(
    model: nn.Module, compute_dtype: str | torch.dtype = "bfloat16", device: str | torch.device | None = None
) -> nn.Module:
    """Frozen block Linears computing in float8 (fusedit.model.perf.apply_float8_compute), in the fp8 slot instead
    of fp8 storage. `device`: where training will run (default: CUDA when available), which must be sm89+."""
    from fusedit.model.perf import apply_float8_compute, float8_compute_support

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    supported, reason = float8_compute_support(device)
    if not supported:
        raise RuntimeError(f"precision.fp8_compute=true: {reason}. Use precision.fp8_storage=true instead.")
    _enter_stage(model, "fp8")
    return apply_float8_compute(model, compute_dtype=to_dtype(compute_dtype), device=device)


def lora(model: nn.Module, **lora_kwargs) -> nn.Module:
    """PEFT LoRA (fusedit.lora.adapter); under autocast the adapters read their bf16 inputs without an fp32 copy
    (fusedit.model.perf.lora_inputs_follow_autocast)."""
    from fusedit.model.perf import lora_inputs_follow_autocast

    _enter_stage(model, "lora")
    lora_kwargs["dtype"] = to_dtype(lora_kwargs.get("dtype", torch.float32))
    if lora_kwargs.get("init_from") is not None:  # a path: read (and checked) in the model's layout
        from fusedit.lora.adapter import model_layout
        from fusedit.lora.init_from import read_init_lora

        lora_kwargs["init_from"] = read_init_lora(
            lora_kwargs["init_from"], lora_kwargs["rank"], lora_kwargs.get("targets", "attn_mlp"), model_layout(model)
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


def _checkpointed_forward(forward, *args, **kwargs):
    if torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def activation_checkpointing(model: nn.Module, every: int = 1, offload: bool = False) -> nn.Module:
    """Recompute every `every`-th transformer block in the backward pass (1 = all blocks, 0 = off).

    All blocks use diffusers' own switch. Every k-th block patches that block's `forward` on the instance rather
    than wrapping the module, so parameter names (and thus LoRA keys and checkpoints) do not change. `offload`
    keeps the checkpointed blocks' saved inputs in (pinned) CPU memory until backward (perf.offloaded_checkpoint).
    """
    from fusedit.model.perf import offloaded_checkpoint

    if every < 0:
        raise ValueError(f"activation checkpointing interval must be >= 0, got {every}")
    if offload and every == 0:
        raise ValueError("model.checkpoint_offload=true needs model.activation_checkpointing >= 1")
    _enter_stage(model, "activation_checkpointing")
    if every == 1:
        model.enable_gradient_checkpointing(
            **({"gradient_checkpointing_func": offloaded_checkpoint} if offload else {})
        )
    elif every > 1:
        wrapper = offloaded_checkpoint if offload else _checkpointed_forward
        for index, block in enumerate(model.transformer_blocks):
            if index % every == 0:
                block.forward = functools.partial(wrapper, block.forward)
    return model


def compile_blocks(model: nn.Module, **compile_kwargs) -> nn.Module:
    """Regional compilation: the repeated transformer block is compiled once and reused by every block."""
    _enter_stage(model, "compile")
    model.compile_repeated_blocks(**compile_kwargs)
    return model


def build_transformer(
    path: str | Path,
    layout: str,
    dtype: str | torch.dtype | None,
    lora_kwargs: dict,
    fp8: bool | dict = False,
    checkpoint_every: int = 0,
    compile: bool | dict = False,
    fp8_compute: bool | dict = False,
    checkpoint_offload: bool = False,
    resident_blocks: int | None = None,
) -> nn.Module:
    """All stages in order, as the config asks for them. `fp8_compute` replaces `fp8` (both fill the fp8 slot).

    `resident_blocks`: None keeps every block on the device; N streams all blocks but the last N from host memory
    (needs `checkpoint_every=1`, refuses `compile`). Raises ValueError for those combinations before loading."""
    if resident_blocks is not None:
        if checkpoint_every != 1:
            raise ValueError(
                "model.resident_blocks (streaming blocks from host memory) needs model.activation_checkpointing=1: "
                "the backward pass must recompute each streamed block to copy it in again"
            )
        if compile:
            raise ValueError(
                "model.resident_blocks (streaming blocks from host memory) cannot be used with model.compile"
            )
    model = load(path, layout, dtype)
    if fp8_compute:
        model = float8_compute(model, **(fp8_compute if isinstance(fp8_compute, dict) else {}))
    elif fp8:
        model = fp8_storage(model, **(fp8 if isinstance(fp8, dict) else {}))
    model = lora(model, **lora_kwargs)
    if resident_blocks is not None:
        model = stream(model, resident_blocks)
    if checkpoint_every or checkpoint_offload:
        model = activation_checkpointing(model, checkpoint_every, offload=checkpoint_offload)
    if compile:
        model = compile_blocks(model, **(compile if isinstance(compile, dict) else {}))
    return model


def fsdp_wrap_policy() -> set[type[nn.Module]]:
    """FSDP auto-wrap: one unit per transformer block (trainer=fsdp)."""
    from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock

    return {QwenImageTransformerBlock}
