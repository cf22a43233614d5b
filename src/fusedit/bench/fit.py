"""The GPU fit check: each training profile's plan, stepped at the full shape under its card's memory, measured beside
the planner's prediction (issue 11: "cap the GPU to 24 / 16 / 12 GB, run a few full-shape steps of each profile").

    python -m fusedit.bench.fit --json fit.json --markdown fit.md [--profiles 12gb,16gb,rtx4090,a100,h100]
        [--size full|tiny] [--warmup 1] [--steps 3] [--time-budget SECONDS] [--pcie-gbps 25]

Per profile, in its own subprocess (an out-of-memory error or a crash ends that profile only, and every profile
starts from an empty allocator):
1. compose `train.py trainer=<profile>` (fusedit.plan) and predict its plan for the card the profile names (CARDS);
2. build the transformer as train.py does with that plan (fusedit.step.build: fuse, fp8 storage, LoRA, block
   streaming, checkpointing, compile) on a random base in the storage dtype (no weights exist on a lent machine;
   random values are enough for memory and time), with the profile's optimizer; when the plan keeps the encoders on
   the GPU (cache.enabled=false) the text encoder's and VAE's weights are allocated beside it (uninitialised and not
   run: the step holds their bytes, not their compute);
3. cap the process at the card's memory (`torch.cuda.set_per_process_memory_fraction`; the build runs before the
   cap, as train.py builds on the CPU and only the steps must fit), reset the peak counters;
4. run `warmup` + `steps` trainer steps (fusedit.step's loss under the precision's autocast, backward, optimizer
   step) and record `torch.cuda.max_memory_allocated`, `max_memory_reserved`, step times and the bytes the block
   streamer copied host->GPU per step.

`--size tiny` runs the same code at the bench's tiny shape (the streamed profiles keep at most all but one block
resident), which is how the CPU tests check it; memory is then not measured (no CUDA counters). The parent writes the
JSON and the markdown after every profile and starts no profile it expects to end past `--time-budget` (the longest
profile so far; 90 s before the first).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The card each training profile is set for (GB = 1e9 bytes) and the cap the check runs it under. a100 and h100 run
# uncapped on the lent GPU (>= 80 GB), so that their measured peak is known even past 80 GB.
CARDS = {"12gb": (12, 12), "16gb": (16, 16), "rtx4090": (24, 24), "a100": (80, None), "h100": (80, None)}
DEFAULT_PROFILES = ("12gb", "16gb", "rtx4090", "a100", "h100")
FIRST_PROFILE_S = 90.0  # expected duration of a profile before one has run (full shape, H100-class GPU)
# Qwen2.5-VL at the tiny pipeline's scale (fusedit.tiny), for `--size tiny`'s live-encoder profiles.
TINY_TEXT_ENCODER = {
    "text_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": 1024,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        "tie_word_embeddings": False,
    },
    "vision_config": {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 32,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [1],
    },
    "tie_word_embeddings": False,
}


# ------------------------------------------------------------------------------------------------ one profile
def encoder_modules(size: str, dtype):
    """(text encoder, VAE) of `size` on the meta device in `dtype`: Qwen2.5-VL-7B and Qwen-Image's VAE for `full`."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLQwenImage
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from fusedit.plan.predict import QWEN25_VL_7B

    with init_empty_weights():
        config = Qwen2_5_VLConfig(**(QWEN25_VL_7B if size == "full" else TINY_TEXT_ENCODER))
        text_encoder = Qwen2_5_VLForConditionalGeneration(config)
        vae = AutoencoderKLQwenImage() if size == "full" else AutoencoderKLQwenImage(base_dim=8, num_res_blocks=1)
    return text_encoder.to(dtype), vae.to(dtype)


def profile_config(profile: str, eight_bit: bool) -> tuple:
    """(the composed train.py config of `trainer=<profile>`, notes); optim=adamw when the profile asks for
    adamw8bit and bitsandbytes is missing (said in the notes, and predicted as adamw)."""
    from fusedit.train_config import compose_train_config

    overrides = [f"trainer={profile}"]
    cfg = compose_train_config(overrides, fill_demo=False)
    if cfg.optim.name == "adamw8bit" and not eight_bit:
        cfg = compose_train_config([*overrides, "optim=adamw"], fill_demo=False)
        return cfg, ["bitsandbytes missing: optim=adamw instead of the profile's adamw8bit (predicted as adamw)"]
    return cfg, []


def _plan_and_prediction(cfg, size: str, card_gb: float, estimates):
    """(plan, model config, facts, choice) of `cfg` at `size`; at tiny the resident block count is capped so that
    at least one block streams."""
    import dataclasses

    import torch
    from hydra.utils import instantiate

    from fusedit.bench.shapes import SHAPES
    from fusedit.plan.choose import evaluate
    from fusedit.plan.config import _targets, config_plan
    from fusedit.plan.predict import ModelFacts, encoder_counts, training_shape, transformer_facts

    base = SHAPES[size]
    shape = training_shape(
        base, base.target_size, base.edit_sizes, int(cfg.data.batch_size), int(cfg.lora.rank), _targets(cfg)
    )
    plan = config_plan(cfg)
    model_config = instantiate(cfg.model)
    if plan.resident_blocks is not None and plan.resident_blocks >= shape.num_layers:
        plan = dataclasses.replace(plan, resident_blocks=shape.num_layers - 1)
        model_config.resident_blocks = plan.resident_blocks
    block_bytes, other_bytes, lora = transformer_facts(shape, model_config.layout)
    counts = encoder_counts(*encoder_modules(size, torch.bfloat16))
    facts = ModelFacts(shape, model_config.layout, block_bytes, other_bytes, lora, *counts)
    return plan, model_config, facts, evaluate(plan, facts, estimates, card_gb)


def _trainer_step(cfg, model_config, facts, encoders_on_gpu: bool, size: str, device, seed: int):
    """(one trainer step as a function, the model, what else it keeps on the device): the model built as train.py
    builds it on a random base, the profile's optimizer, synthetic inputs, and the encoders' weights when the plan
    keeps them on the GPU (allocated, not run)."""
    import torch
    from hydra.utils import instantiate

    from fusedit.bench.shapes import build_random_transformer, make_inputs
    from fusedit.devices import to_dtype
    from fusedit.step.build import build_transformer
    from fusedit.step.loss import EditLoss

    precision = instantiate(cfg.precision)
    base_dtype = to_dtype(precision.base_dtype)
    base = build_random_transformer(facts.shape, device, base_dtype, seed)
    model = build_transformer(base, model_config, instantiate(cfg.lora), precision, device)
    encoders = [m.to_empty(device=device) for m in encoder_modules(size, base_dtype)] if encoders_on_gpu else []
    optimizer = instantiate(cfg.optim.optimizer)(params=[p for p in model.parameters() if p.requires_grad])
    inputs = make_inputs(facts.shape, device, base_dtype, seed)
    edit_loss = EditLoss(instantiate(cfg.objective), model_config.attention)

    def step() -> torch.Tensor:
        with precision.autocast(device):
            loss, _ = edit_loss.loss(model, inputs, seed)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step, model, (encoders, optimizer, inputs)


def _measure(step, model, device, cap_gb: float | None, warmup: int, steps: int, predicted_gb: float) -> dict:
    """Cap the device at `cap_gb`, run the steps; step times, streamed bytes and (CUDA) peak memory."""
    import torch

    from fusedit.bench.measure import summarize, time_steps
    from fusedit.model.streaming import block_streamer

    measured = {}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        if cap_gb is not None:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gb * 1e9 / total), device)
        torch.cuda.reset_peak_memory_stats(device)
        measured["resident_before_steps_gb"] = torch.cuda.memory_allocated(device) / 1e9
        # What the build left reserved counts against the cap too (segments a live tensor keeps from being freed).
        measured["reserved_before_steps_gb"] = torch.cuda.memory_reserved(device) / 1e9
    streamer = block_streamer(model)
    moved_before = streamer.bytes_moved if streamer else 0
    times, loss = time_steps(step, device, warmup, steps)
    moved = (streamer.bytes_moved - moved_before) if streamer else 0
    measured.update(summarize(times), times_s=times, loss=float(loss))
    measured["host_to_gpu_gb_per_step"] = moved / (warmup + steps) / 1e9
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 1e9
        measured.update(
            peak_allocated_gb=peak,
            peak_reserved_gb=torch.cuda.max_memory_reserved(device) / 1e9,
            measured_over_predicted=peak / predicted_gb,
        )
    return measured


def run_profile(profile: str, size: str, warmup: int, steps: int, estimates_path: str | None, seed: int = 0) -> dict:
    """Build and step `profile`'s plan in this process (module docstring); the result record of one profile."""
    import torch

    from fusedit.bench.flops import step_flops
    from fusedit.optim import bitsandbytes_available
    from fusedit.plan.predict import Estimates

    card_gb, cap_gb = CARDS[profile]
    cfg, notes = profile_config(profile, bitsandbytes_available())
    plan, model_config, facts, choice = _plan_and_prediction(cfg, size, card_gb, Estimates(estimates_path))
    if not plan.cache:
        notes.append("text encoder + VAE weights allocated on the GPU (not run)")
    record = {"profile": profile, "card_gb": card_gb, "cap_gb": cap_gb, "plan": plan.to_dict(),
              "plan_description": plan.describe(), "predicted": choice.to_dict(), "notes": notes,
              "shape": facts.shape.to_dict(), "step_tflop": step_flops(facts.shape, facts.layout)["step"] / 1e12,
              # unrounded, to set beside the streamer's count
              "predicted_moved_gb_per_step": choice.prediction.moved_gb_per_step}  # fmt: skip
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    step, model, _kept = _trainer_step(cfg, model_config, facts, not plan.cache, size, device, seed)
    started = time.perf_counter()
    record["measured"] = _measure(step, model, device, cap_gb, warmup, steps, choice.prediction.peak_gpu_gb)
    record["steps_s"] = time.perf_counter() - started
    return record


def floors(record: dict, pcie_gbps: float, device_name: str | None) -> dict:
    """Step-time floors of a profile's plan: host->GPU transfer of the predicted bytes at `pcie_gbps`, and compute
    at the dense bf16 peak of `device_name` (fusedit.bench.flops; recomputation not counted, the MFU convention)."""
    from fusedit.bench.flops import peak_tflops

    step_tflop = record["step_tflop"]
    peak = peak_tflops(device_name)
    return {
        "pcie_gbps": pcie_gbps,
        "host_to_gpu_floor_s": record["predicted_moved_gb_per_step"] / pcie_gbps,
        "compute_floor_s": step_tflop / peak if peak else None,
    }


# ------------------------------------------------------------------------------------------------ the parent
def _child(args: argparse.Namespace) -> int:
    """`--child PROFILE --result PATH`: run one profile, write its record (or the error) to PATH."""
    from fusedit.io import write_json_atomic

    try:
        record = run_profile(args.child, args.size, args.warmup, args.steps, args.estimates)
        record["status"] = "ok"
    except Exception as error:  # an OOM or a broken build: recorded, the parent goes on with the next profile
        import torch

        record = {"profile": args.child, "status": "oom" if isinstance(error, torch.OutOfMemoryError) else "error",
                  "error": f"{type(error).__name__}: {str(error)[:2000]}"}  # fmt: skip
        if torch.cuda.is_available():
            record["peak_allocated_gb_at_error"] = torch.cuda.max_memory_allocated() / 1e9
    write_json_atomic(Path(args.result), record)
    return 0 if record["status"] == "ok" else 1


def _run_child(profile: str, args: argparse.Namespace, timeout_s: float, workdir: Path) -> dict:
    result = workdir / f"{profile}.json"
    command = [sys.executable, "-m", "fusedit.bench.fit", "--child", profile, "--result", str(result),
               "--size", args.size, "--warmup", str(args.warmup), "--steps", str(args.steps),
               "--estimates", args.estimates]  # fmt: skip
    started = time.perf_counter()
    try:
        completed = subprocess.run(command, timeout=timeout_s, check=False)
        returncode = completed.returncode
    except subprocess.TimeoutExpired:
        returncode = None
    wall = time.perf_counter() - started
    if result.is_file():
        record = json.loads(result.read_text())
    elif returncode is None:
        record = {"profile": profile, "status": "timeout", "error": f"stopped after {timeout_s:.0f} s"}
    else:
        record = {"profile": profile, "status": "error", "error": f"exit {returncode} without a result (killed?)"}
    record["wall_s"] = wall
    return record


def machine(device_name: str | None) -> dict:
    import platform

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device_name=device_name, memory_gb=props.total_memory / 1e9, cuda=torch.version.cuda)
    else:
        info.update(device_name=None, note="no CUDA device: a test of the check, nothing measured for memory")
    return info


def markdown(report: dict) -> str:
    def number(value, spec=".2f"):
        return "–" if value is None else format(value, spec)

    lines = [
        f"GPU fit check ({report['settings']['size']} shape, {report['settings']['warmup']} warm-up + "
        f"{report['settings']['steps']} timed steps per profile), {report['machine'].get('device_name') or 'CPU'}; "
        f"GB = 1e9 bytes; transfer floor at {report['settings']['pcie_gbps']:g} GB/s host->GPU",
        "",
        "| profile | cap GB | predicted peak GB | measured peak GB (max_memory_allocated) | measured / predicted | "
        "reserved GB | step s (median) | host->GPU GB/step predicted / measured | transfer floor s | "
        "compute floor s | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for record in report["profiles"]:
        predicted, measured = record.get("predicted", {}), record.get("measured", {})
        floor = record.get("floors", {})
        status = record["status"] + (f": {record['error'][:120]}" if record.get("error") else "")
        lines.append(
            f"| {record['profile']} | {number(record.get('cap_gb'), 'g')} | "
            f"{number(predicted.get('predicted_peak_gpu_gb'))} | {number(measured.get('peak_allocated_gb'))} | "
            f"{number(measured.get('measured_over_predicted'), '.3f')} | {number(measured.get('peak_reserved_gb'))} | "
            f"{number(measured.get('step_s'), '.3f')} | {number(record.get('predicted_moved_gb_per_step'), '.4g')} / "
            f"{number(measured.get('host_to_gpu_gb_per_step'), '.4g')} | "
            f"{number(floor.get('host_to_gpu_floor_s'), '.3g')} | "
            f"{number(floor.get('compute_floor_s'), '.3f')} | {status} |"
        )
    lines += [
        "",
        *[f"- {r['profile']}: {r['plan_description']}" for r in report["profiles"] if "plan_description" in r],
    ]
    return "\n".join(lines) + "\n"


def run_fit(args: argparse.Namespace) -> int:
    import torch

    from fusedit.io import write_json_atomic, write_text_atomic

    device_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    report = {
        "settings": {key: getattr(args, key) for key in ("size", "warmup", "steps", "time_budget", "pcie_gbps")},
        "machine": machine(device_name),
        "command": " ".join(sys.argv),
        "profiles": [],
    }

    def write() -> None:
        if args.json:
            write_json_atomic(Path(args.json), report)
        if args.markdown:
            write_text_atomic(Path(args.markdown), markdown(report))

    started, longest, failed = time.perf_counter(), FIRST_PROFILE_S, False
    with tempfile.TemporaryDirectory(prefix="fusedit-fit-") as workdir:
        args.estimates = args.estimates or str(Path(workdir) / "estimates.json")
        for profile in args.profiles:
            left = args.time_budget - (time.perf_counter() - started)
            if left < longest:
                card_gb, cap_gb = CARDS[profile]
                skipped = {"profile": profile, "card_gb": card_gb, "cap_gb": cap_gb, "status": "skipped: time budget"}
                report["profiles"].append(skipped)
                write()
                continue
            print(f"fit: {profile} (at most {left:.0f} s)", flush=True)
            record = _run_child(profile, args, left, Path(workdir))
            longest = max(longest if report["profiles"] else 0.0, record["wall_s"])
            if "predicted" in record:
                record["floors"] = floors(record, args.pcie_gbps, device_name)
            failed |= record["status"] != "ok"
            report["profiles"].append(record)
            write()
    print(markdown(report), flush=True)
    return 1 if failed or any(r["status"] != "ok" for r in report["profiles"]) else 0


def build_parser() -> argparse.ArgumentParser:
    from fusedit.plan.predict import DEFAULT_PCIE_GBPS, parse_bandwidth

    parser = argparse.ArgumentParser(
        prog="python -m fusedit.bench.fit",
        description="Step each training profile's plan at the full shape under its card's memory cap (one "
        "subprocess per profile) and record measured peak memory and step time beside the planner's prediction.",
    )
    parser.add_argument("--profiles", type=lambda text: [p.strip() for p in text.split(",") if p.strip()],
                        default=list(DEFAULT_PROFILES), help=f"comma-separated, of {', '.join(CARDS)}")  # fmt: skip
    parser.add_argument("--size", choices=["full", "tiny"], default="full")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--time-budget", type=float, default=420.0, help="seconds for all profiles (default 420)")
    parser.add_argument("--pcie-gbps", type=parse_bandwidth, default=DEFAULT_PCIE_GBPS,
                        help="host->GPU GB/s for the transfer floor: a number or a link name (pcie4_x16 = 25, "
                        "pcie5_x16 = 50); default pcie4_x16")  # fmt: skip
    parser.add_argument("--estimates", default=None, help="the planner's estimate cache (default: a temporary file)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    unknown = [profile for profile in args.profiles if profile not in CARDS]
    if unknown or not args.profiles:
        print(f"fusedit: error: --profiles: unknown {unknown}; choose from {', '.join(CARDS)}", file=sys.stderr)
        return 2
    return _child(args) if args.child else run_fit(args)


if __name__ == "__main__":
    raise SystemExit(main())
