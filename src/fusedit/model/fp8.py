"""FP8 for the frozen base weights: stored as float8_e4m3fn (fp8 storage), or also computing in float8 GEMMs.

Storage: `apply_fp8_storage` keeps the weights as float8_e4m3fn in memory and upcasts them per layer for the
matmul.

This halves the memory of the frozen 20B base against bf16 on any device (CPU included) without changing the
compute dtype. The weight is upcast inside a custom autograd function that saves the *fp8* weight for backward and
upcasts it again there: a plain `F.linear(x, weight.to(bf16))` would keep a bf16 copy of every weight alive until
backward and give the memory back. Frozen weights get no weight-gradient GEMM at all.

Scales: `tensor` (one fp32 scale per matrix) or `row` (one per output row, which tracks outlier rows better).
The module subclasses `nn.Linear` so PEFT wraps it like any Linear; it advertises `compute_dtype` so PEFT keeps
LoRA weights in the compute dtype instead of casting them to fp8. Apply it before LoRA (build order: fusedit.step.build).

Float8 GEMMs: `apply_float8_compute` swaps the frozen base Linears of the transformer blocks for
`Float8ComputeLinear`: weights stored once in float8_e4m3fn, activations cast per call, forward and input-gradient
GEMMs in float8 through `torch._scaled_mm` (the kernel torchao's float8 training runs). Unlike torchao's
`Float8Linear`, which always computes the weight-gradient GEMM (torchao/float8/float8_linear.py), the frozen base
here never does: a LoRA step needs only the input gradient. sm89+ GPUs (Ada, Hopper, Blackwell) only; whether a
device qualifies is `float8_compute_support`'s answer, the one place that rule lives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fusedit.model.module_map import ENTRY_EXIT_LAYERS, QWEN21_ENTRY_EXIT_LAYERS, QWEN21_TRANSFORMER_CLASS

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


def high_precision_layers(module: nn.Module) -> tuple[str, ...]:
    """The top-level layers of `module` that fp8 keeps in the compute dtype: everything outside the blocks.

    The MMDiT rule (module_map.ENTRY_EXIT_LAYERS: `img_in`, `txt_in`, `time_text_embed`, `norm_out`, `proj_out`) is
    the one musubi-tuner applies to Qwen-Image: only Linears inside `transformer_blocks` are quantized
    (`FP8_OPTIMIZATION_TARGET_KEYS` in src/musubi_tuner/qwen_image/qwen_image_model.py). The entry and exit layers
    hold a negligible share of the weights; an entry layer's error reaches every block, an exit layer's the output.

    Qwen-Image-2.1 (module_map.QWEN21_ENTRY_EXIT_LAYERS) also keeps its one shared `modulation` Linear (dim -> 4 dim,
    about 1% of the weights in diffusers' default 2.1 config). The MMDiT's per-block `img_mod` / `txt_mod` Linears
    are quantized with their block (musubi-tuner does too) and each one's error stays in its block; 2.1 computes
    every block's scales and gates from this one matrix (`hidden * (1 + scale)`, `gate.tanh() * branch`), so its
    error would enter every block, twice. 2.1's blocks hold only attention and SwiGLU Linears, quantized as the
    MMDiT's are. Any module that is not a 2.1 transformer (a block, a test model) gets the MMDiT's list.
    """
    is_qwen21 = any(cls.__name__ == QWEN21_TRANSFORMER_CLASS for cls in type(module).__mro__)
    return QWEN21_ENTRY_EXIT_LAYERS if is_qwen21 else ENTRY_EXIT_LAYERS


def apply_fp8_storage(
    module: nn.Module,
    granularity: str = "row",
    compute_dtype: torch.dtype = torch.bfloat16,
    skip: tuple[str, ...] | None = None,
) -> nn.Module:
    """Replace the plain Linears inside the transformer blocks with fp8-storage ones, in place.

    `skip` (module-path prefixes) stays in full precision; None: `high_precision_layers(module)`, the layers outside
    the blocks of either family.
    """
    skip = high_precision_layers(module) if skip is None else skip
    return swap_frozen_linears(
        module, lambda linear: Fp8StorageLinear(linear, granularity, compute_dtype), skip, "fp8 storage"
    )


# --------------------------------------------------------------------------------------------------------------------
# Float8 GEMMs for the frozen base

E4M3, E5M2 = FP8_DTYPE, torch.float8_e5m2
FLOAT8_MIN_CAPABILITY = (8, 9)


def float8_compute_support(device: torch.device | str) -> tuple[bool, str]:
    """(supported, reason): float8 GEMMs need a CUDA device of compute capability 8.9 or newer."""
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"float8 GEMMs need a CUDA GPU with compute capability >= 8.9 (Ada/Hopper); got {device.type}"
    if not torch.cuda.is_available():
        return False, "float8 GEMMs need a CUDA GPU, and CUDA is not available"
    capability = torch.cuda.get_device_capability(device)
    if capability < FLOAT8_MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return False, f"float8 GEMMs need compute capability >= 8.9; {name} has {capability[0]}.{capability[1]}"
    return True, "ok"


def _to_float8(tensor: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # Per-tensor dynamic scaling: the scale maps amax to the format's largest finite value.
    amax = tensor.detach().abs().amax().float()
    scale = (amax / torch.finfo(dtype).max).clamp(min=torch.finfo(torch.float32).tiny)
    return (tensor.float() / scale).to(dtype), scale


class _Float8Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight_fp8, weight_scale, bias, out_dtype):
        flat = x.reshape(-1, x.shape[-1])
        x_fp8, x_scale = _to_float8(flat, E4M3)
        # _scaled_mm wants its second operand column-major: the transpose of a row-major [out, in] weight is.
        out = torch._scaled_mm(
            x_fp8,
            weight_fp8.t(),
            scale_a=x_scale,
            scale_b=weight_scale,
            bias=None if bias is None else bias.to(out_dtype),
            out_dtype=out_dtype,
        )
        ctx.save_for_backward(weight_fp8, weight_scale)
        ctx.bias_needs_grad = bias is not None and bias.requires_grad
        ctx.out_dtype = out_dtype
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_output):
        weight_fp8, weight_scale = ctx.saved_tensors
        flat = grad_output.reshape(-1, grad_output.shape[-1])
        grad_input = None
        if ctx.needs_input_grad[0]:
            # Gradients need range more than precision: e5m2. The weight is needed as [out, in] column-major here.
            grad_fp8, grad_scale = _to_float8(flat, E5M2)
            grad_input = torch._scaled_mm(
                grad_fp8,
                weight_fp8.t().contiguous().t(),
                scale_a=grad_scale,
                scale_b=weight_scale,
                out_dtype=ctx.out_dtype,
            ).reshape(*grad_output.shape[:-1], weight_fp8.shape[1])
        # The frozen weight gets no gradient, so its GEMM is never run.
        grad_bias = flat.sum(0) if ctx.bias_needs_grad else None
        return grad_input, None, None, grad_bias, None


class Float8ComputeLinear(FrozenFp8Linear):
    """A frozen Linear computing in float8: e4m3 weight (one fp32 scale) kept from construction, per-call
    dynamically scaled e4m3 inputs and e5m2 gradients. Subclasses nn.Linear so PEFT wraps it like any Linear."""

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype = torch.bfloat16):
        if linear.in_features % 16 or linear.out_features % 16:
            raise ValueError(
                f"float8 GEMMs need both Linear sizes to be multiples of 16, got {linear.in_features}x{linear.out_features}"
            )
        source = linear.dequantized_weight(torch.float32) if isinstance(linear, FrozenFp8Linear) else linear.weight
        weight_fp8, scale = _to_float8(source.detach(), E4M3)
        super().__init__(linear, weight_fp8, scale, compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Float8Matmul.apply(x, self.weight, self.weight_scale, self.bias, self.forward_dtype(x))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, compute=float8_e4m3fn"


def apply_float8_compute(
    module: nn.Module,
    compute_dtype: torch.dtype = torch.bfloat16,
    skip: tuple[str, ...] | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Replace the frozen Linears inside the transformer blocks with `Float8ComputeLinear`, in place (`skip`: as
    for `apply_fp8_storage`).

    A build stage in the `fp8` slot (before LoRA): it also stores the weights in fp8, so it replaces fp8 storage
    rather than stacking on it (an Fp8StorageLinear is accepted and re-scaled per tensor). Refused off sm89+
    GPUs: CPUs and older GPUs either lack the kernel or emulate it far slower than a bf16 GEMM.
    """
    if device is None:  # else: the device the model will train on (a model built on the CPU, moved later)
        parameter = next(module.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
    supported, reason = float8_compute_support(device)
    if not supported:
        raise RuntimeError(f"apply_float8_compute: {reason}. Use fp8 storage (apply_fp8_storage) instead.")
    skip = high_precision_layers(module) if skip is None else skip
    return swap_frozen_linears(
        module,
        lambda linear: Float8ComputeLinear(linear, compute_dtype),
        skip,
        "float8 compute",
        replaceable=(nn.Linear, Fp8StorageLinear),
    )
