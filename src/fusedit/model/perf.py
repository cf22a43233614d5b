"""Speed switches for the LoRA training step that are not build stages of their own.

- Prompt padding: `trim_prompt_padding` drops the padding columns every sample shares and returns no mask when
  nothing is left padded, so SDPA can take its fast unmasked kernels (cuDNN / flash refuse arbitrary masks).
- Attention backend: `attention_backend(name)` pins SDPA to a backend (or a priority order); `sdpa_backends`
  reads which backend actually ran from a torch.profiler trace.
- Checkpoint offload: `offloaded_checkpoint` is `torch.utils.checkpoint.checkpoint` (non-reentrant) with the
  saved block inputs moved to CPU (`torch.autograd.graph.save_on_cpu`), so checkpointing every block costs
  almost no device memory for activations; `use_offloaded_checkpoints(model)` switches a checkpointed model to it.
- Float8 GEMMs: `apply_float8_compute` swaps the frozen base Linears of the transformer blocks for
  `Float8ComputeLinear`: weights stored once in float8_e4m3fn, activations cast per call, forward and
  input-gradient GEMMs in float8 through `torch._scaled_mm` (the kernel torchao's float8 training runs). Unlike
  torchao's `Float8Linear`, which always computes the weight-gradient GEMM (torchao/float8/float8_linear.py), the
  frozen base here never does: a LoRA step needs only the input gradient. sm89+ GPUs (Ada, Hopper, Blackwell) only.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fusedit.model.fp8 import ENTRY_EXIT_LAYERS, Fp8StorageLinear, FrozenFp8Linear, swap_frozen_linears

# --------------------------------------------------------------------------------------------------------------------
# Attention backend

# Priority orders for torch.nn.attention.sdpa_kernel; "auto" leaves PyTorch's own choice alone.
_BACKEND_ORDERS = {
    "cudnn": ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"),
    "flash": ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH"),
    "efficient": ("EFFICIENT_ATTENTION", "FLASH_ATTENTION", "CUDNN_ATTENTION", "MATH"),
    "math": ("MATH",),
}
ATTENTION_BACKENDS = ("auto", *_BACKEND_ORDERS)


@contextlib.contextmanager
def attention_backend(name: str = "auto") -> Iterator[None]:
    """Prefer SDPA backend `name` (falling back in a fixed order when it cannot run the call); "auto": no change."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {name!r}")
    if name == "auto":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [getattr(SDPBackend, member) for member in _BACKEND_ORDERS[name]]
    with sdpa_kernel(order, set_priority=len(order) > 1):
        yield


# Profiler event name fragments -> backend. aten op names first (CPU and CUDA), then CUDA kernel names.
_SDPA_EVENT_PATTERNS = (
    ("_scaled_dot_product_flash_attention_for_cpu", "flash_cpu"),
    ("_scaled_dot_product_cudnn_attention", "cudnn"),
    ("_scaled_dot_product_flash_attention", "flash"),
    ("_scaled_dot_product_efficient_attention", "efficient"),
    ("_scaled_dot_product_fused_attention_overrideable", "overrideable"),
    ("_scaled_dot_product_attention_math", "math"),
    ("cudnn_generated_fort_native_sdpa", "cudnn"),
    ("flash_fwd", "flash"),
    ("fmha_cutlass", "efficient"),
)


def sdpa_backends(event_names: Iterable[str]) -> list[str]:
    """The SDPA backends that ran, from profiler event names (aten ops or CUDA kernels), in first-seen order.

    The math backend has no op of its own once decomposed; a trace with `scaled_dot_product_attention` calls and
    no fused-kernel op therefore reports "math".
    """
    found: list[str] = []
    saw_sdpa = False
    for name in event_names:
        if "scaled_dot_product" in name:
            saw_sdpa = True
        for fragment, backend in _SDPA_EVENT_PATTERNS:
            if fragment in name:
                if backend not in found:
                    found.append(backend)
                break
    if saw_sdpa and not found:
        found.append("math")
    return found


# --------------------------------------------------------------------------------------------------------------------
# Activation checkpointing with CPU offload


def offloaded_checkpoint(function, *args, pin_memory: bool | None = None, **kwargs):
    """Non-reentrant activation checkpoint whose saved inputs live on the CPU until the backward pass needs them.

    Inside the checkpointed region nothing is saved (it is recomputed); what checkpointing keeps is the region's
    inputs, and `save_on_cpu` moves those. Drop-in for diffusers' `gradient_checkpointing_func` and for
    `torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`.
    """
    if not torch.is_grad_enabled():
        return function(*args, **kwargs)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    with torch.autograd.graph.save_on_cpu(pin_memory=pin_memory):
        return checkpoint(function, *args, use_reentrant=False, **kwargs)


def use_offloaded_checkpoints(model: nn.Module, pin_memory: bool | None = None) -> nn.Module:
    """Switch a model whose every block is checkpointed (diffusers' `enable_gradient_checkpointing`) to offload."""
    if not getattr(model, "gradient_checkpointing", False):
        raise ValueError(
            "checkpoint offload needs activation checkpointing of every block first "
            "(fusedit.step.build.activation_checkpointing(model, every=1))"
        )
    model.enable_gradient_checkpointing(
        gradient_checkpointing_func=functools.partial(offloaded_checkpoint, pin_memory=pin_memory)
    )
    return model


# --------------------------------------------------------------------------------------------------------------------
# Float8 GEMMs for the frozen base

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
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
    skip: tuple[str, ...] = ENTRY_EXIT_LAYERS,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Replace the frozen Linears inside the transformer blocks with `Float8ComputeLinear`, in place.

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
    return swap_frozen_linears(
        module,
        lambda linear: Float8ComputeLinear(linear, compute_dtype),
        skip,
        "float8 compute",
        replaceable=(nn.Linear, Fp8StorageLinear),
    )


# --------------------------------------------------------------------------------------------------------------------
# LoRA inputs under autocast


def _cast_unless_autocast(self, x, dtype):
    if x is not None and torch.is_autocast_enabled(x.device.type):
        return x
    return type(self)._cast_input_dtype(self, x, dtype)


def lora_inputs_follow_autocast(model: nn.Module) -> int:
    """Skip PEFT's cast of a LoRA layer's input to the adapter dtype while autocast is on; returns the layer count.

    With fp32 adapters on a bf16 model PEFT runs `x.to(float32)` before `lora_A`: an fp32 copy of every adapted
    activation, which autocast casts straight back to bf16 for the GEMM. Under autocast that round trip is pure
    memory traffic and changes no value (bf16 -> fp32 -> bf16 is exact; `lora.dropout` > 0 scales in bf16 instead
    of fp32), so it is skipped; without autocast (fp32 training, inference) the cast stays, as fp32 weights need
    fp32 inputs there. The check runs per call, so checkpoint recomputation and compiled code agree with eager.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    count = 0
    for module in model.modules():
        if isinstance(module, BaseTunerLayer) and hasattr(module, "_cast_input_dtype"):
            module._cast_input_dtype = _cast_unless_autocast.__get__(module)
            count += 1
    return count


__all__ = [
    "ATTENTION_BACKENDS",
    "Float8ComputeLinear",
    "apply_float8_compute",
    "attention_backend",
    "float8_compute_support",
    "lora_inputs_follow_autocast",
    "offloaded_checkpoint",
    "sdpa_backends",
    "use_offloaded_checkpoints",
]
