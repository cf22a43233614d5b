"""FP8 storage for the frozen base weights: float8_e4m3fn in memory, upcast per layer for the matmul.

This halves the memory of the frozen 20B base against bf16 on any device (CPU included) without changing the
compute dtype. The weight is upcast inside a custom autograd function that saves the *fp8* weight for backward and
upcasts it again there: a plain `F.linear(x, weight.to(bf16))` would keep a bf16 copy of every weight alive until
backward and give the memory back. Frozen weights get no weight-gradient GEMM at all.

Scales: `tensor` (one fp32 scale per matrix) or `row` (one per output row, which tracks outlier rows better).
The module subclasses `nn.Linear` so PEFT wraps it like any Linear; it advertises `compute_dtype` so PEFT keeps
LoRA weights in the compute dtype instead of casting them to fp8. Apply it before LoRA (build order: fusedit.training.build).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fusedit.model.module_map import ENTRY_EXIT_LAYERS

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
GRANULARITIES = ("tensor", "row")


def quantize_fp8(weight: torch.Tensor, granularity: str = "row") -> tuple[torch.Tensor, torch.Tensor]:
    """Scale `weight` into float8_e4m3fn's range; returns (fp8 weight, fp32 scale with weight ≈ fp8 * scale)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"fp8 granularity must be one of {GRANULARITIES}, got {granularity!r}")
    weight = weight.detach().float()
    amax = weight.abs().amax(dim=1, keepdim=True) if granularity == "row" else weight.abs().amax().reshape(1, 1)
    scale = (amax / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    return (weight / scale).to(FP8_DTYPE), scale


class _Fp8StorageMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight_fp8, scale, bias, compute_dtype):
        weight = weight_fp8.to(compute_dtype) * scale.to(compute_dtype)
        ctx.save_for_backward(weight_fp8, scale)
        ctx.compute_dtype = compute_dtype
        ctx.bias_needs_grad = bias is not None and bias.requires_grad
        return F.linear(x.to(compute_dtype), weight, None if bias is None else bias.to(compute_dtype))

    @staticmethod
    def backward(ctx, grad_output):
        weight_fp8, scale = ctx.saved_tensors
        grad_input = None
        if ctx.needs_input_grad[0]:
            weight = weight_fp8.to(ctx.compute_dtype) * scale.to(ctx.compute_dtype)
            grad_input = grad_output.to(ctx.compute_dtype) @ weight
        grad_bias = grad_output.flatten(0, -2).sum(0) if ctx.bias_needs_grad else None
        return grad_input, None, None, grad_bias, None


class FrozenFp8Linear(nn.Linear):
    """A frozen Linear whose weight lives in float8_e4m3fn with fp32 scales; subclasses say how it computes.

    Subclassing nn.Linear lets PEFT wrap it like any Linear; `compute_dtype` tells PEFT to create LoRA weights in
    that dtype rather than in the storage dtype.
    """

    def __init__(self, linear: nn.Linear, weight_fp8: torch.Tensor, scale: torch.Tensor, compute_dtype: torch.dtype):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(weight_fp8, requires_grad=False)
        self.register_buffer("weight_scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(compute_dtype), False)
        self.compute_dtype = compute_dtype

    def _apply(self, fn, recurse=True):
        # Device moves are welcome; dtype casts (e.g. Lightning's bf16-true `model.to(bfloat16)`) are not: the
        # storage stays fp8 (fp8 -> bf16 -> fp8 is exact, so undoing the cast is lossless) and the scales fp32.
        scale = self.weight_scale
        super()._apply(fn, recurse)
        if self.weight.dtype != FP8_DTYPE:
            self.weight.data = self.weight.data.to(FP8_DTYPE)
        if self.weight_scale.dtype != torch.float32:
            self.weight_scale = scale.to(self.weight_scale.device)
        return self

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.compute_dtype
        return self.weight.to(dtype) * self.weight_scale.to(dtype)

    def forward_dtype(self, x: torch.Tensor) -> torch.Tensor:
        """The dtype this call computes in: autocast's when it is on, else the input's (never an fp8 or int)."""
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        return dtype if dtype in (torch.bfloat16, torch.float16, torch.float32) else self.compute_dtype


class Fp8StorageLinear(FrozenFp8Linear):
    """fp8 storage, upcast per call: the matmul runs in the compute dtype."""

    def __init__(self, linear: nn.Linear, granularity: str = "row", compute_dtype: torch.dtype = torch.bfloat16):
        weight_fp8, scale = quantize_fp8(linear.weight, granularity)
        super().__init__(linear, weight_fp8, scale, compute_dtype)
        self.granularity = granularity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Fp8StorageMatmul.apply(x, self.weight, self.weight_scale, self.bias, self.forward_dtype(x))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, storage=float8_e4m3fn, scale={self.granularity}"


def swap_frozen_linears(
    module: nn.Module, make, skip: tuple[str, ...], what: str, replaceable=(nn.Linear,)
) -> nn.Module:
    """Replace every Linear of exactly a `replaceable` type outside `skip` by `make(linear)`, in place.

    Refused once LoRA is applied: swapping would silently change the base layer under PEFT's wrappers.
    """
    replacements = []
    for name, child in module.named_modules():
        if any(name == prefix or name.startswith(prefix + ".") for prefix in skip):
            continue
        if hasattr(child, "base_layer") or "lora" in type(child).__module__:
            raise RuntimeError(
                f"{name} already carries a LoRA adapter: apply {what} before LoRA, not after "
                "(build order: load -> fp8 -> LoRA -> checkpointing -> compile)"
            )
        if type(child) in replaceable:
            replacements.append(name)
    for name in replacements:
        parent_name, _, attribute = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attribute, make(getattr(parent, attribute)))
    return module


def apply_fp8_storage(
    module: nn.Module,
    granularity: str = "row",
    compute_dtype: torch.dtype = torch.bfloat16,
    skip: tuple[str, ...] = ENTRY_EXIT_LAYERS,
) -> nn.Module:
    """Replace the plain Linears inside the transformer blocks with fp8-storage ones, in place.

    The small entry/exit layers (`skip`) stay in full precision: they hold a negligible share of the weights
    and the largest share of the quantization error.
    """
    return swap_frozen_linears(
        module, lambda linear: Fp8StorageLinear(linear, granularity, compute_dtype), skip, "fp8 storage"
    )
