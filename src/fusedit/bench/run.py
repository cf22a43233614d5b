"""Run the variants side by side on one shape per model family and report them (JSON + markdown).

A run may hold variants of both families (the MMDiT's and Qwen-Image-2.1's, `Variant.family`): each steps on its
family's shape, all of them in the same interleaved rounds on a CPU, and each is compared with its own family's
baseline (`baselines` in the report)."""

from __future__ import annotations

import dataclasses
import datetime
import gc
import os
import platform
import time
import traceback
from collections.abc import Callable, Mapping

import torch

from fusedit.bench.flops import peak_tflops, step_flops
from fusedit.bench.measure import (
    PeakMemory,
    count_qkv_matmuls,
    profile_step,
    summarize,
    synchronize,
    time_steps,
    time_steps_round_robin,
)
from fusedit.bench.memory import estimate_step_memory
from fusedit.bench.shapes import MMDIT, BenchShape, make_inputs
from fusedit.bench.variants import BENCH_PRECISIONS, Variant, build_variant, family_baselines, make_step
from fusedit.lora.adapter import lora_parameters
from fusedit.model.attention import attention_backend
from fusedit.step.objective import FlowMatchObjective

SCHEMA = "fusedit.bench/1"
VARIANT_FIELDS = (
    "name", "status", "reason", "description", "step_s", "step_s_min", "step_s_max", "step_s_q1", "step_s_q3",
    "times_s", "samples_per_s", "tokens_per_s", "step_tflop", "tflops", "mfu", "peak_mem_gb", "peak_mem_kind",
    "matmul_calls", "matmul_calls_by_op", "qkv_matmuls_per_block", "sdpa_backend", "loss", "speedup_vs_standard",
    "speedup_vs_baseline", "wall_s", "est_peak_mem_gb", "memory_estimate", "spread", "speedup_range",
    "speedup_unclear", "family",
)  # fmt: skip
# A variant whose slowest timed step took more than this many times its fastest was measured under changing load
# (a shared CPU, clocks, another process): a ratio of two such medians says little.
MAX_SPREAD = 2.0


def machine_info(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "device_name": None,
        "capability": None,
        "peak_bf16_tflops": None,
    }
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        info.update(
            device_name=name,
            capability=".".join(map(str, torch.cuda.get_device_capability(device))),
            peak_bf16_tflops=peak_tflops(name),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            memory_gb=torch.cuda.get_device_properties(device).total_memory / 1e9,
        )
    return info


@dataclasses.dataclass
class _Built:
    """One variant ready to step: the model (kept for the QKV GEMM count) and the trainer's step on it."""

    model: torch.nn.Module
    step: Callable[[], float]


def _build(variant: Variant, shape: BenchShape, device: torch.device, dtype: torch.dtype, seed: int) -> _Built:
    torch.manual_seed(seed)
    model = build_variant(variant, shape, device, dtype, seed)
    parameters = list(lora_parameters(model).values())
    optimizer = torch.optim.AdamW(parameters, lr=1e-5, fused=device.type == "cuda")
    inputs = make_inputs(shape, device, dtype, seed)
    step = make_step(model, inputs, variant, optimizer, FlowMatchObjective(weighting="none"), dtype, seed)
    return _Built(model, step)


def _measured_fields(
    built: _Built, variant: Variant, shape: BenchShape, device: torch.device, dtype: torch.dtype, times, loss, memory
) -> dict:
    """A variant's result fields from its timed steps and peak memory, plus one profiled step (GEMMs, SDPA backend)
    and the QKV GEMM count; call under the run's `attention_backend`."""
    counts = profile_step(built.step, device)
    qkv = count_qkv_matmuls(built.model, dtype)
    stats = summarize(times)
    flops = step_flops(shape, variant.layout)["step"]
    tflops = flops / stats["step_s"] / 1e12
    peak = peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    return {
        **stats,
        "times_s": times,
        "samples_per_s": shape.batch / stats["step_s"],
        "tokens_per_s": shape.batch * shape.tokens / stats["step_s"],
        "step_tflop": flops / 1e12,
        "tflops": tflops,
        "mfu": None if peak is None else tflops / peak,
        "peak_mem_gb": memory.gb,
        "peak_mem_kind": memory.kind,
        "qkv_matmuls_per_block": qkv,
        "loss": float(loss),
        **counts,
    }


def _measure(
    variant: Variant,
    shape: BenchShape,
    device: torch.device,
    dtype: torch.dtype,
    warmup: int,
    steps: int,
    seed: int,
    attention: str,
) -> dict:
    # Everything the variant allocates is local to this frame: it is gone once the frame is (returned or unwound),
    # which run_variant relies on to hand the memory back before the next variant builds its model.
    built = _build(variant, shape, device, dtype, seed)
    memory = PeakMemory(device)
    with attention_backend(attention):
        synchronize(device)
        memory.baseline()
        with memory:
            times, loss = time_steps(built.step, device, warmup, steps)
        return _measured_fields(built, variant, shape, device, dtype, times, loss, memory)


def release_memory(device: torch.device) -> None:
    """Give back what a finished (or failed) variant held: compiled code, reference cycles, cached CUDA blocks."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _new_result(variant: Variant) -> dict:
    return {
        "name": variant.name,
        "family": variant.family,
        "description": variant.description,
        "status": "ok",
        "reason": None,
    }


def _add_memory_estimate(result: dict, variant: Variant, shape: BenchShape, dtype: torch.dtype, seed: int) -> None:
    try:
        estimate = estimate_step_memory(variant, shape, dtype, seed)
        result.update(est_peak_mem_gb=estimate["peak_gb"], memory_estimate=estimate)
    except ValueError as error:  # a variant the estimate cannot represent (offload): say so, time it anyway
        result["memory_estimate"] = {"error": str(error)}


def _failure(error: Exception) -> dict:
    """The status fields of a variant whose build or step raised `error` (out of memory says so)."""
    if isinstance(error, torch.OutOfMemoryError):
        return {"status": "failed", "reason": f"out of memory: {str(error).splitlines()[0]}"}
    trace = "".join(traceback.format_exception(error))
    return {"status": "failed", "reason": f"{type(error).__name__}: {error}", "traceback": trace}


def run_variant(
    variant: Variant,
    shape: BenchShape,
    device: torch.device,
    dtype: torch.dtype,
    warmup: int,
    steps: int,
    seed: int = 0,
    attention: str = "auto",
    estimate_memory: bool = False,
    timed: bool = True,
) -> dict:
    """One variant's result dict; a variant that cannot run here is `skipped`, one that breaks `failed` (an
    out-of-memory error says so in its reason), and either way its memory is released before this returns.

    `estimate_memory`: also predict the step's peak memory on fake tensors (fusedit.bench.memory), fields
    `est_peak_mem_gb` and `memory_estimate`. `timed=False`: only that prediction, status `estimated`.
    """
    result = _new_result(variant)
    if estimate_memory or not timed:
        _add_memory_estimate(result, variant, shape, dtype, seed)
        if not timed:
            error = result["memory_estimate"].get("error")
            return {**result, "status": "skipped" if error else "estimated", "reason": error}
    reason = variant.unsupported(device)
    if reason is not None:
        return {**result, "status": "skipped", "reason": reason}
    try:
        result.update(_measure(variant, shape, device, dtype, warmup, steps, seed, attention))
    except Exception as error:  # one broken variant must not lose the others' numbers
        result.update(_failure(error))
    # Only now (outside the except blocks, whose exception and traceback kept the failed step's frames and their
    # tensors alive) is everything the variant built unreachable.
    release_memory(device)
    return result


def _now() -> float:
    return time.monotonic()


def _pending(variant: Variant) -> dict:
    return {
        "name": variant.name,
        "family": variant.family,
        "description": variant.description,
        "status": "pending",
        "reason": "not run yet (the run is still going, or was stopped before this variant finished)",
    }


def _estimate_s(next_variant: Variant, done: list[tuple[Variant, dict]]) -> float:
    """Expected wall time of the next variant: the slowest finished one of its kind (compiled or eager, since
    compiling dominates a compiled variant's time), else the slowest finished one; 0 before any has run."""
    walls = [r["wall_s"] for v, r in done if r.get("wall_s") is not None and v.compile == next_variant.compile]
    walls = walls or [r["wall_s"] for _, r in done if r.get("wall_s") is not None]
    return max(walls, default=0.0)


def finalize_report(report: dict) -> dict:
    """(Re)compute the baseline and speedups over the variants present, and fill every field (null if unknown)."""
    results = report["variants"]
    ok = {r["name"]: r for r in results if r["status"] == "ok"}
    families = list(dict.fromkeys(r.get("family") or MMDIT for r in results)) or [MMDIT]
    baselines = {family: next((name for name in family_baselines(family) if name in ok), None) for family in families}
    # `baseline`: the first family's (the MMDiT's when it ran), as in reports from before 2.1; `baselines`: each's.
    report["baseline"] = baselines[families[0]]
    report["baselines"] = baselines
    for result in results:
        fine = result["status"] == "ok"
        family = result.get("family") or MMDIT
        baseline, standard = baselines[family], family_baselines(family)[0]
        result["speedup_vs_standard"] = ok[standard]["step_s"] / result["step_s"] if fine and standard in ok else None
        result["speedup_vs_baseline"] = ok[baseline]["step_s"] / result["step_s"] if fine and baseline else None
        _speedup_uncertainty(result, ok.get(baseline) if fine and baseline else None)
        for field in VARIANT_FIELDS:
            result.setdefault(field, None)
    return report


@dataclasses.dataclass(frozen=True)
class _Run:
    """What every variant of one `run_bench` call shares."""

    shapes: Mapping[str, BenchShape]  # family -> its shape
    device: torch.device
    dtype: torch.dtype
    warmup: int
    steps: int
    seed: int
    attention: str
    start: float
    time_budget_s: float | None
    estimate_memory: bool
    on_progress: Callable[[dict], None] | None

    def shape_of(self, variant: Variant) -> BenchShape:
        return self.shapes[variant.family]


def run_bench(
    shape: BenchShape | Mapping[str, BenchShape],
    variants: list[Variant],
    device: torch.device | str,
    dtype: torch.dtype,
    warmup: int = 2,
    steps: int = 5,
    seed: int = 0,
    attention: str = "auto",
    command: str | None = None,
    time_budget_s: float | None = None,
    on_progress: Callable[[dict], None] | None = None,
    estimate_memory: bool = False,
    timed: bool = True,
    interleave: bool | None = None,
) -> dict:
    """Time every variant on the same shape, inputs and seed; returns the report dict (schema `fusedit.bench/1`).

    `shape`: the shape of every variant, or family -> shape (fusedit.bench.shapes.FAMILIES) when the variants are of
    more than one family; each variant steps on its family's (ValueError if it has none).

    `interleave` (default: on a CPU): hold every variant at once and time their steps round-robin
    (`_run_interleaved`), so that a machine's changing load falls on all of them alike; otherwise (a GPU, where at
    the full shape two variants do not fit together and each one's peak memory must be its own) one variant after
    another (`run_variant`). Settings field `order` says which.
    `on_progress(report)` is called before the first variant and after each one with the report so far (the
    variants not run yet have status `pending`, `complete` is false until the last), so a run that is killed
    still leaves the numbers it had. With `time_budget_s`, a variant is not started when the time elapsed plus
    the expected time of that variant (`_estimate_s`) would pass the budget: it and the rest are `skipped`.
    `estimate_memory` / `timed`: see `run_variant` (`timed=False` needs no memory: the full shape on a CPU).
    """
    device = torch.device(device)
    if warmup < 0 or steps < 1:
        raise ValueError(f"need warmup >= 0 and steps >= 1, got warmup={warmup}, steps={steps}")
    if time_budget_s is not None and time_budget_s <= 0:
        raise ValueError(f"the time budget must be > 0, got {time_budget_s} s")
    interleaved = timed and (device.type == "cpu" if interleave is None else interleave)
    shapes = dict(shape) if isinstance(shape, Mapping) else {shape.family: shape}
    missing = sorted({variant.family for variant in variants} - set(shapes))
    if missing:
        raise ValueError(f"no benchmark shape for the variants of family {', '.join(missing)}")
    run = _Run(
        shapes, device, dtype, warmup, steps, seed, attention, _now(), time_budget_s, estimate_memory, on_progress
    )
    report = _new_report(shapes, variants, device, dtype, warmup, steps, seed, attention, command, time_budget_s)
    report["settings"].update(
        timed=timed,
        memory_estimate=estimate_memory or not timed,
        order="interleaved" if interleaved else "sequential",
    )
    _publish(report, run)
    if interleaved:
        _run_interleaved(report, variants, run)
    else:
        _run_sequential(report, variants, run, timed)
    return report


def _publish(report: dict, run: _Run) -> None:
    report["elapsed_s"] = _now() - run.start
    report["complete"] = all(r["status"] != "pending" for r in report["variants"])
    finalize_report(report)
    if run.on_progress is not None:
        run.on_progress(report)


def _over_budget(variant: Variant, done: list[tuple[Variant, dict]], run: _Run) -> dict | None:
    """The `skipped` result of a variant that would end past the time budget, else None."""
    elapsed, estimate = _now() - run.start, _estimate_s(variant, done)
    if run.time_budget_s is None or elapsed + estimate <= run.time_budget_s:
        return None
    return {
        **_pending(variant),
        "status": "skipped",
        "reason": f"time budget: {elapsed / 60:.1f} min elapsed + ~{estimate / 60:.1f} min expected "
        f"> {run.time_budget_s / 60:.1f} min",
    }


def _run_sequential(report: dict, variants: list[Variant], run: _Run, timed: bool) -> None:
    done: list[tuple[Variant, dict]] = []
    for index, variant in enumerate(variants):
        result = _over_budget(variant, done, run)
        if result is None:
            began = _now()
            result = run_variant(
                variant, run.shape_of(variant), run.device, run.dtype, run.warmup, run.steps, run.seed, run.attention,
                estimate_memory=run.estimate_memory, timed=timed,
            )  # fmt: skip
            if result["status"] != "skipped":  # a variant this device cannot run took no time to say so
                result["wall_s"] = _now() - began
        done.append((variant, result))
        report["variants"][index] = result
        _publish(report, run)


@dataclasses.dataclass
class _Warm:
    """A variant of an interleaved run, built and warmed up, waiting for its timed steps."""

    built: _Built
    memory: PeakMemory
    times: list[float]  # its first timed step when there is no warm-up (that step measured the memory)
    loss: float
    wall_s: float


def _warm_up(variant: Variant, run: _Run) -> _Warm:
    began = _now()
    built = _build(variant, run.shape_of(variant), run.device, run.dtype, run.seed)
    memory = PeakMemory(run.device)
    synchronize(run.device)
    memory.baseline()
    # The variant's peak memory is measured here, on its own steps right after its build: during the timed rounds
    # every variant's model is resident, which a process-wide measure (RSS growth) would also count.
    with memory:
        times, loss = time_steps(built.step, run.device, run.warmup, 0 if run.warmup else 1)
    return _Warm(built, memory, times, loss, _now() - began)


def _run_interleaved(report: dict, variants: list[Variant], run: _Run) -> None:
    """Build and warm up each variant in turn (compiling happens here; not compared), time `steps` rounds of one
    step of each (`time_steps_round_robin`), then profile each. All the models are held at once: a CPU run of the
    tiny or a partial shape affords it. `release_memory` (which resets torch.compile's caches) runs once, at the
    end: between variants it would make the variants still to be timed compile again."""
    with attention_backend(run.attention):
        warm = _warm_up_all(report, variants, run)
        rounds = run.steps - (0 if run.warmup else 1)  # without warm-up, the first timed step ran in _warm_up
        times, losses, errors = time_steps_round_robin({i: w.built.step for i, w in warm.items()}, run.device, rounds)
        for index, w in warm.items():
            began = _now()
            result = {**report["variants"][index], "status": "ok", "reason": None}  # keeps a memory estimate
            try:
                if index in errors:
                    raise errors[index]
                loss = losses[index] if times[index] else w.loss
                result.update(
                    _measured_fields(
                        w.built,
                        variants[index],
                        run.shape_of(variants[index]),
                        run.device,
                        run.dtype,
                        w.times + times[index],
                        loss,
                        w.memory,
                    )
                )
            except Exception as error:
                result.update(_failure(error))
            result["wall_s"] = w.wall_s + sum(times[index]) + (_now() - began)
            report["variants"][index] = result
            _publish(report, run)
        warm.clear()
    release_memory(run.device)


def _warm_up_all(report: dict, variants: list[Variant], run: _Run) -> dict[int, _Warm]:
    """Each variant built and warmed up, by its index; those that cannot run here, would pass the time budget or
    fail are reported at once. The others stay `pending` (with their memory estimate, if asked) until timed."""
    warm: dict[int, _Warm] = {}
    done: list[tuple[Variant, dict]] = []
    for index, variant in enumerate(variants):
        result = report["variants"][index]
        if run.estimate_memory:
            _add_memory_estimate(result, variant, run.shape_of(variant), run.dtype, run.seed)
        reason = variant.unsupported(run.device)
        if reason is not None:
            result.update(status="skipped", reason=reason)
        elif (skipped := _over_budget(variant, done, run)) is not None:
            result.update(skipped)
        else:
            try:
                warm[index] = _warm_up(variant, run)
                done.append((variant, {"wall_s": warm[index].wall_s}))
                continue
            except Exception as error:  # one broken variant must not lose the others' numbers
                result.update(_failure(error))
        _publish(report, run)
    return warm


def _speedup_uncertainty(result: dict, base: dict | None) -> None:
    """`spread` (slowest / fastest timed step), `speedup_range` (the speedup between the two variants' interquartile
    ranges: base q1 / variant q3 .. base q3 / variant q1) and `speedup_unclear`: the ranges overlap, or either
    variant's spread is over MAX_SPREAD, so the median ratio cannot be told apart from the noise of the run."""
    if result.get("step_s_min") and result.get("step_s_max"):
        result["spread"] = result["step_s_max"] / result["step_s_min"]
    if base is None or result is base or not all(r.get(k) for r in (result, base) for k in ("step_s_q1", "step_s_q3")):
        return
    low, high = base["step_s_q1"] / result["step_s_q3"], base["step_s_q3"] / result["step_s_q1"]
    result["speedup_range"] = [low, high]
    noisy = max(result.get("spread") or 1.0, base.get("spread") or 1.0) > MAX_SPREAD
    result["speedup_unclear"] = noisy or low <= 1.0 <= high


def _new_report(shapes, variants, device, dtype, warmup, steps, seed, attention, command, time_budget_s) -> dict:
    """The report before any variant ran: every variant `pending`. `shape` / `flops` are the first family's (the
    MMDiT's when it runs; the fields of reports from before 2.1), `shapes` / `flops_by_family` every family's."""
    ran = list(dict.fromkeys(variant.family for variant in variants))
    families = [family for family in shapes if family in ran] or list(shapes)
    shape = shapes[families[0]]
    return {
        "schema": SCHEMA,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "complete": not variants,
        "elapsed_s": 0.0,
        "time_budget_s": time_budget_s,
        "machine": machine_info(device),
        "shape": shape.to_dict(),
        "settings": {
            "dtype": str(dtype).removeprefix("torch."),
            # The trainer's precision config the dtype stands for (a variant's fp8 modifier sets precision.fp8).
            "precision": dataclasses.asdict(BENCH_PRECISIONS[dtype]),
            "warmup_steps": warmup,
            "timed_steps": steps,
            "seed": seed,
            "attention": attention,
            "optimizer": "AdamW over the LoRA parameters",
            "step": "fusedit.step.loss.EditLoss under the precision's autocast, as EditLoRAModule.training_step",
        },
        "flops": step_flops(shape, "merged_qkv"),
        "shapes": {family: shapes[family].to_dict() for family in families},
        "flops_by_family": {family: step_flops(shapes[family], "merged_qkv") for family in families},
        "baseline": None,
        "variants": [_pending(variant) for variant in variants],
    }


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _speedup(result: dict) -> str:
    value = result.get("speedup_vs_baseline", result.get("speedup_vs_standard"))
    if value is None:
        return "–"
    low_high = result.get("speedup_range")
    text = f"{value:.2f}x" + (f" ({low_high[0]:.2f}–{low_high[1]:.2f})" if low_high else "")
    return text + (" ⚠" if result.get("speedup_unclear") else "")


def spread_warning(report: dict) -> str | None:
    """One line naming the variants whose speedup the run's timing spread leaves unclear, or None."""
    unclear = [r["name"] for r in report.get("variants", []) if r.get("status") == "ok" and r.get("speedup_unclear")]
    if not unclear:
        return None
    spreads = [r["spread"] for r in report["variants"] if r.get("status") == "ok" and r.get("spread")]
    return (
        f"⚠ speedups of {', '.join(unclear)} are within the timing noise of this run (steps of one variant differ "
        f"by up to {max(spreads):.1f}x; a speedup is clear when the interquartile ranges do not overlap and no "
        f"variant spreads over {MAX_SPREAD:g}x): measure on an idle machine, or with more --steps"
    )


def _estimate_table(report: dict) -> list[str]:
    """Rows of a `timed=False` report: the predicted memory of each variant, nothing measured."""
    lines = [
        "predicted peak memory of one LoRA training step (fake tensors, nothing allocated: fusedit.bench.memory); "
        "GB = 1e9 bytes, comparable to `torch.cuda.max_memory_allocated`",
        "",
        "| variant | est. peak GB | weights + inputs GB | step adds GB | notes |",
        "|---|---|---|---|---|",
    ]
    for r in report["variants"]:
        estimate = r.get("memory_estimate") or {}
        if r["status"] != "estimated":
            lines.append(f"| {r['name']} | {r['status']}: {r['reason']} | | | |")
            continue
        lines.append(
            f"| {r['name']} | {estimate['peak_gb']:.2f} | {estimate['resident_gb']:.2f} | {estimate['step_gb']:.2f} "
            f"| {'; '.join(estimate['notes']) or '–'} |"
        )
    return lines


def _shape_lines(report: dict) -> list[str]:
    """One `_shape_line` per family in the run (reports from before 2.1 have `shape` only)."""
    shapes = report.get("shapes") or {report["shape"].get("family", MMDIT): report["shape"]}
    flops = report.get("flops_by_family") or {family: report["flops"] for family in shapes}
    return [_shape_line(shape, report["settings"], flops[family]) for family, shape in shapes.items()]


def _shape_line(shape: dict, settings: dict, flops: dict) -> str:
    """What was stepped: the shape, the LoRA, the precision config, the steps and the FLOPs of one step."""
    steps = (
        f"{settings['warmup_steps']} warm-up + {settings['timed_steps']} timed steps; "
        if settings.get("timed", True)
        else ""
    )
    precision = settings.get("precision")  # reports from before the bench stepped through fusedit.step lack it
    dtype = settings["dtype"]
    if precision:
        dtype += f" (precision={precision['name']}: {precision['lora_dtype']} LoRA, {precision['lightning']})"
    family = "Qwen-Image-2.1 " if shape.get("family", MMDIT) != MMDIT else ""
    return (
        f"{family}shape `{shape['name']}`: {shape['num_layers']} blocks, width {shape['inner_dim']}, "
        f"{shape['image_tokens']} image + {shape['text_tokens']} text tokens, batch {shape['batch']}, "
        f"LoRA r{shape['lora_rank']} on {shape['lora_targets']}; {dtype}, {steps}"
        f"{flops['step'] / 1e12:.4g} TFLOP/step (merged)"
    )


def _baseline_header(report: dict) -> str:
    baselines = [name for name in (report.get("baselines") or {}).values() if name]
    if len(baselines) > 1:
        return " / ".join(baselines)
    return report.get("baseline") or "standard"


def _projection_header(report: dict) -> str:
    """What the GEMM-count column counts: q/k/v, and for 2.1 also the SwiGLU's gate/up (the merged projections)."""
    families = {r.get("family") or MMDIT for r in report["variants"]}
    if families == {MMDIT}:
        return "QKV"
    return "q/k/v (2.1: + gate/up)" if MMDIT in families else "q/k/v + gate/up"


def _timed_table(report: dict) -> list[str]:
    """Rows of a timed report: one a variant, measured figures (and the predicted peak with --estimate-memory)."""
    estimated = report["settings"].get("memory_estimate", False)
    lines = [
        f"| variant | step s (median) | min–max | vs {_baseline_header(report)} | samples/s | tokens/s "
        "| TFLOP/s | MFU | peak mem GB "
        + ("| est. peak GB " if estimated else "")
        + f"| matmuls/step | {_projection_header(report)} GEMMs/block (base+LoRA) | SDPA |"
    ]
    columns = 13 if estimated else 12
    lines.append("|" + "---|" * columns)
    for r in report["variants"]:
        if r["status"] != "ok":
            lines.append(f"| {r['name']} | {r['status']}: {r['reason']} |" + " |" * (columns - 2))
            continue
        qkv = r["qkv_matmuls_per_block"] or {}
        mem = _fmt(r["peak_mem_gb"], ".3f") + (" (RSS)" if r["peak_mem_kind"] == "cpu_rss_growth" else "")
        if estimated:
            mem += f" | {_fmt(r['est_peak_mem_gb'], '.3f')}"
        lines.append(
            f"| {r['name']} | {r['step_s']:.4f} | {r['step_s_min']:.4f}–{r['step_s_max']:.4f} "
            f"| {_speedup(r)} | {r['samples_per_s']:.3g} | {r['tokens_per_s']:.4g} "
            f"| {r['tflops']:.3g} | {_fmt(r['mfu'], '.1%')} | {mem} | {_fmt(r['matmul_calls'], 'd')} "
            f"| {qkv.get('base', '–')}+{qkv.get('lora', '–')} | {r['sdpa_backend'] or '–'} |"
        )
    warning = spread_warning(report)
    if warning:
        lines.extend(["", warning])
    return lines


def _variant_lines(report: dict) -> list[str]:
    """The shape line, notes on the baseline and on a partial run, then the timed or the estimate table."""
    lines = _shape_lines(report)
    if len(lines) > 1:
        lines.append("")
        lines.append(
            "each `2.1:` variant is compared with the Qwen-Image-2.1 baseline of this run, the others with the MMDiT's"
        )
    baseline = report.get("baseline")
    if baseline is not None and baseline != "standard":
        lines.append("")
        lines.append(
            f"speedups are against `{baseline}`: plain `standard` is not in this run or failed (at the full "
            "shape it does not fit 80 GB without activation checkpointing)"
        )
    if not report.get("complete", True):
        finished = sum(r["status"] not in ("pending",) for r in report["variants"])
        lines.append("")
        lines.append(
            f"**partial report**: {finished} of {len(report['variants'])} variants done "
            "(the run is still going, or was stopped)"
        )
    lines.append("")
    lines.extend(_timed_table(report) if report["settings"].get("timed", True) else _estimate_table(report))
    return lines


def _data_lines(data: dict) -> list[str]:
    """The data-pipeline table: images and samples per second by loader worker count, then per-stage times."""
    lines = [
        f"data pipeline: {data['samples']} samples ({data['images_per_sample']} images each, "
        f"{data['source']}), decode + resize + bucket + collate",
        "",
        "| workers | images/s | samples/s |",
        "|---|---|---|",
    ]
    for row in data["loader"]:
        lines.append(f"| {row['num_workers']} | {row['images_per_s']:.1f} | {row['samples_per_s']:.1f} |")
    stages = data.get("stages_ms_per_image")
    if stages:
        lines.append("")
        lines.append("per image, one process: " + ", ".join(f"{k} {v:.1f} ms" for k, v in stages.items()))
    return lines


def markdown_table(report: dict) -> str:
    """The report as a markdown table (plus the data-pipeline table when measured)."""
    lines = _variant_lines(report) if report.get("variants") else []
    data = report.get("data")
    if data:
        if lines:
            lines.append("")
        lines.extend(_data_lines(data))
    return "\n".join(lines) + "\n"
