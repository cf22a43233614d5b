"""The precision a step runs in: dtypes of the frozen base and the LoRA, fp8 for the base, Lightning's precision.

One config (`conf/precision/*.yaml`, whose `_target_` is `Precision`) sets all of it. The trainer hands `lightning` to `Trainer(precision=...)`,
which runs the forward pass under autocast for the `*-mixed` settings; `autocast` reproduces that context without
Lightning (same dtype, same `cache_enabled=False` as lightning.pytorch.plugins.precision.MixedPrecision), so the
bench and other Lightning-free callers step exactly as the trainer does.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

# Lightning precision settings that autocast the forward pass, and the torch dtype they autocast to (MixedPrecision).
# Names, not dtypes: config validation reads this module before torch is imported.
AUTOCAST_DTYPES = {"bf16-mixed": "bfloat16", "16-mixed": "float16"}
FP8_CHOICES = ("none", "storage", "float8")


@dataclass
class Precision:
    """What `conf/precision/<name>.yaml` holds (the fp32 preset's values as defaults).

    base_dtype: the frozen transformer, VAE and text encoder. lora_dtype: the LoRA weights and their optimizer
    state. lightning: `Trainer(precision=...)`. fp8: `none`, `storage` (frozen block Linears stored as
    float8_e4m3fn, upcast per layer; fusedit.model.fp8) or `float8` (frozen block Linears computing in float8
    GEMMs, sm89+ GPUs; fusedit.model.fp8 too). fp8_granularity: `row` or `tensor` scales for fp8 storage.
    compute_dtype: the dtype fp8 weights are upcast to / float8 GEMMs write.
    """

    name: str = "fp32"
    base_dtype: str = "float32"
    lora_dtype: str = "float32"
    lightning: str = "32-true"
    fp8: str = "none"
    fp8_granularity: str = "row"
    compute_dtype: str = "float32"

    def __post_init__(self):
        if self.fp8 not in FP8_CHOICES:
            raise ValueError(f"precision.fp8 must be one of {' | '.join(FP8_CHOICES)}, got {self.fp8!r}")

    def autocast(self, device) -> contextlib.AbstractContextManager:
        """The context the trainer's forward pass runs in on `device` (autocast for `*-mixed`, else nothing)."""
        dtype = AUTOCAST_DTYPES.get(self.lightning)
        if dtype is None:
            return contextlib.nullcontext()
        import torch

        return torch.autocast(torch.device(device).type, dtype=getattr(torch, dtype), cache_enabled=False)


# The conf/precision presets, for the bench (a dtype stands for one; tests/test_step.py checks them against conf/).
PRESETS = {
    "fp32": Precision(),
    "bf16": Precision(
        name="bf16", base_dtype="bfloat16", lora_dtype="float32", lightning="bf16-mixed", compute_dtype="bfloat16"
    ),
    "fp8": Precision(
        name="fp8",
        base_dtype="bfloat16",
        lora_dtype="float32",
        lightning="bf16-mixed",
        fp8="storage",
        compute_dtype="bfloat16",
    ),
}
