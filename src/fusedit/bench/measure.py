"""What the benchmark measures around a training step: wall time, peak memory, GEMM calls, the SDPA backend."""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable, Mapping

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fusedit.model.attention import sdpa_backends
from fusedit.model.module_map import QKV_GROUPS, QWEN21_ATTENTION_GROUP, QWEN21_MLP, QWEN21_MLP_GROUP

# Leaf GEMM ops (aten::linear / aten::matmul are wrappers that call these); the profiler names them aten::<op>, and
# also counts the mkldnn/mkl CPU linear ops.
_GEMM_OPS = ("mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "_addmm_activation", "_int_mm")
GEMM_EVENTS = frozenset({*(f"aten::{op}" for op in _GEMM_OPS), "mkldnn::_linear_pointwise", "mkl::_mkl_linear"})


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], float], device: torch.device, warmup: int, steps: int) -> tuple[list[float], float]:
    """Run `warmup` untimed then `steps` timed calls of `step`; returns (seconds per timed step, last loss)."""
    loss = float("nan")
    for _ in range(warmup):
        loss = step()
    synchronize(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times, loss


def time_steps_round_robin(
    steps: Mapping[Hashable, Callable[[], float]], device: torch.device, rounds: int
) -> tuple[dict[Hashable, list[float]], dict[Hashable, float], dict[Hashable, Exception]]:
    """`rounds` rounds of one timed call of every step in turn (A B C, A B C, ...), so that load that comes and goes
    on the machine (a shared CPU) falls on every variant alike instead of on whichever was running at the time.

    Returns the seconds of each timed call and the last loss, per key, and the exception of each step that raised
    (that step is left out of the later rounds; the others go on).
    """
    times = {key: [] for key in steps}
    losses = {key: float("nan") for key in steps}
    errors: dict[Hashable, Exception] = {}
    for _ in range(rounds):
        for key, step in steps.items():
            if key in errors:
                continue
            start = time.perf_counter()
            try:
                losses[key] = step()
                synchronize(device)
            except Exception as error:  # one broken variant must not stop the others' rounds
                errors[key] = error
                continue
            times[key].append(time.perf_counter() - start)
    return times, losses, errors


def summarize(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return {
        "step_s": statistics.median(ordered),
        "step_s_min": ordered[0],
        "step_s_max": ordered[-1],
        "step_s_q1": q1,
        "step_s_q3": q3,
    }


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """Peak memory over a region. CUDA: torch.cuda.max_memory_allocated (kind "cuda_max_allocated").
    CPU: the growth of the process's resident set over its value at `baseline()` (kind "cpu_rss_growth"), sampled
    every few milliseconds; an approximation (the allocator may keep freed pages), null where /proc is missing."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_rss_growth"
        self._base = _rss_bytes()
        self._peak = self._base
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def baseline(self) -> None:
        self._base = self._peak = _rss_bytes()

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            rss = _rss_bytes()
            if rss is not None and self._peak is not None:
                self._peak = max(self._peak, rss)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self._base is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()

    @property
    def gb(self) -> float | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 1e9
        if self._base is None or self._peak is None:
            return None
        return max(0, self._peak - self._base) / 1e9


def _event_names(prof) -> list[str]:
    # prof.events() builds a Python object tree of every event (~0.1 ms each): tens of seconds per profiled step
    # at the full shape on a GPU (60 blocks x ~3000 ops, plus their kernels). The raw kineto results hold the same
    # names at a fraction of the cost; events() stays as the fallback should that attribute ever go.
    results = getattr(getattr(prof, "profiler", None), "kineto_results", None)
    if results is not None:
        return [event.name() for event in results.events()]
    return [event.name for event in prof.events()]


def profile_step(step: Callable[[], float], device: torch.device) -> dict:
    """One profiled step: GEMM calls by op, and the SDPA backend(s) that ran."""
    from torch.profiler import ProfilerActivity, profile

    # libkineto (the profiler's C++ side) prints "profiler_start" / "profiler_stop" lines, and on a machine without a
    # GPU "gpuGetDeviceCount failed", to stderr on every profiled step: noise around the bench's own report. It
    # reads KINETO_LOG_LEVEL once, when the first profile starts; 6 is past its most severe level (USDT = 5), so
    # nothing is printed. A level the user set is kept.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        step()
        synchronize(device)
    names = _event_names(prof)
    counts = Counter(name for name in names if name in GEMM_EVENTS)
    return {
        "matmul_calls": sum(counts.values()),
        "matmul_calls_by_op": dict(sorted(counts.items())),
        "sdpa_backend": ",".join(sdpa_backends(names)) or None,
    }


class _GemmCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in _GEMM_OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _qwen21_projections(block: nn.Module) -> list[nn.Module]:
    """A 2.1 block's projections that fusedit merges: to_qkv + img_mlp.gate_up_proj, or the five they replace."""
    modules = []
    for owner, groups in ((block.attn, QWEN21_ATTENTION_GROUP), (getattr(block, QWEN21_MLP), QWEN21_MLP_GROUP)):
        for merged, parts in groups.items():
            names = [merged] if hasattr(owner, merged) else list(parts)
            modules += [getattr(owner, name) for name in names]
    return modules


def _qkv_projections(block: nn.Module) -> list[nn.Module]:
    if not hasattr(block, "txt_mlp"):  # Qwen-Image-2.1's single-stream block
        return _qwen21_projections(block)
    attn = block.attn
    names = [name for name in QKV_GROUPS if hasattr(attn, name)]
    if not names:
        names = [name for group in QKV_GROUPS.values() for name in group]
    return [getattr(attn, name) for name in names]


def count_qkv_matmuls(model: nn.Module, dtype: torch.dtype) -> dict[str, int]:
    """GEMMs one block issues for its q/k/v projections (image + text stream), forward and backward.

    Runs the projections of block 0 by themselves on a few tokens: `base` counts the frozen projections' GEMMs
    (6 standard, 2 merged), `lora` the adapters' (A and B per projection), `backward` the gradient GEMMs. For a
    Qwen-Image-2.1 block, the projections fusedit merges there: q, k, v and the SwiGLU's gate and up (5 standard,
    2 merged: to_qkv, img_mlp.gate_up_proj).
    """
    block = model.transformer_blocks[0]
    base = forward = backward = 0
    for projection in _qkv_projections(block):
        base_layer = getattr(projection, "base_layer", projection)
        parameter = next(base_layer.parameters())
        x = torch.randn(1, 16, base_layer.in_features, device=parameter.device, dtype=dtype, requires_grad=True)
        with torch.no_grad(), _GemmCounter() as counter:
            base_layer(x)
        base += counter.count
        with _GemmCounter() as counter:
            out = projection(x)
        forward += counter.count
        with _GemmCounter() as counter:
            out.float().sum().backward()
        backward += counter.count
    return {"base": base, "lora": forward - base, "forward": forward, "backward": backward}
