"""Which SDPA kernel the training step's attention runs: `attention_backend(name)` pins SDPA to a backend (or a
priority order); `sdpa_backends` reads which backend actually ran from a torch.profiler trace.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

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


__all__ = ["ATTENTION_BACKENDS", "attention_backend", "sdpa_backends"]
