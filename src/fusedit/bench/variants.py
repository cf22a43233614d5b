"""The benchmark variants: each one is the same random model put through a different set of build stages.

Stages come from fusedit.training.build (LoRA, activation checkpointing, regional compile) in its order
(load -> fp8 -> LoRA -> activation checkpointing -> compile); the perf switches from fusedit.model.perf.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fusedit.bench.shapes import BenchShape, build_random_transformer
from fusedit.model.merged_qkv import fuse_qkv
from fusedit.model.perf import apply_float8_compute, float8_compute_support, use_offloaded_checkpoints
from fusedit.training import build


@dataclass(frozen=True)
class Variant:
    name: str
    layout: str = "merged_qkv"  # "standard": diffusers' unfused model, PEFT on to_q, to_k, to_v, ...
    compile: bool = False
    fp8: str = "none"  # "storage" (float8_e4m3fn weights, bf16 GEMMs) or "float8" (float8 GEMMs, sm89+)
    checkpoint_every: int = 0
    offload: bool = False
    keep_mask: bool = False  # pass the all-ones prompt mask instead of trimming it to None
    description: str = ""

    def unsupported(self, device: torch.device) -> str | None:
        """Why this variant cannot run on `device`, or None."""
        if self.fp8 == "float8":
            supported, reason = float8_compute_support(device)
            return None if supported else reason
        return None


VARIANTS = {
    variant.name: variant
    for variant in (
        Variant("standard", layout="standard", description="diffusers' unfused model + PEFT, eager"),
        Variant("merged", description="merged QKV + LoRA on the merged projections, eager"),
        Variant("merged+mask", keep_mask=True, description="merged, all-ones prompt mask passed (not trimmed)"),
        Variant("merged+compile", compile=True, description="merged, regional torch.compile of the block"),
        Variant("merged+compile+fp8", compile=True, fp8="storage", description="merged, compiled, fp8 storage"),
        Variant(
            "merged+compile+float8",
            compile=True,
            fp8="float8",
            description="merged, compiled, float8 GEMMs for the frozen base (sm89+)",
        ),
        Variant("merged+ckpt", checkpoint_every=1, description="merged, every block checkpointed"),
        Variant("merged+ckpt2", checkpoint_every=2, description="merged, every 2nd block checkpointed"),
        Variant(
            "merged+ckpt+offload",
            checkpoint_every=1,
            offload=True,
            description="merged, every block checkpointed, checkpoints offloaded to CPU",
        ),
        Variant("merged+compile+ckpt", compile=True, checkpoint_every=1, description="merged, compiled, checkpointed"),
    )
}
DEFAULT_VARIANTS = (
    "standard",
    "merged",
    "merged+mask",
    "merged+compile",
    "merged+compile+fp8",
    "merged+compile+float8",
    "merged+ckpt",
    "merged+ckpt+offload",
)


def parse_variants(text: str | list[str] | tuple[str, ...]) -> list[Variant]:
    names = [name.strip() for name in (text.split(",") if isinstance(text, str) else text) if name.strip()]
    if names == ["all"]:
        names = list(VARIANTS)
    unknown = [name for name in names if name not in VARIANTS]
    if unknown or not names:
        raise ValueError(f"unknown benchmark variant(s) {unknown or names}; choose from {list(VARIANTS)} or 'all'")
    return [VARIANTS[name] for name in dict.fromkeys(names)]


def build_variant(
    variant: Variant, shape: BenchShape, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> nn.Module:
    """The trainable model for `variant`: random base (same for every variant), then the build stages in order."""
    model = build_random_transformer(shape, device, dtype, seed)
    if variant.layout == "merged_qkv":
        fuse_qkv(model)
    if variant.fp8 == "storage":
        build.fp8_storage(model, compute_dtype=dtype)
    elif variant.fp8 == "float8":
        apply_float8_compute(model, compute_dtype=dtype)
    # LoRA weights in the compute dtype: PEFT casts a layer's input to the adapter's dtype, so fp32 adapters on a
    # bf16 model would round-trip every adapted activation through fp32.
    build.lora(model, rank=shape.lora_rank, targets=shape.lora_targets, dtype=dtype)
    if variant.checkpoint_every:
        build.activation_checkpointing(model, variant.checkpoint_every)
        if variant.offload:
            use_offloaded_checkpoints(model)
    if variant.compile:
        build.compile_blocks(model)
    return model
