"""Training plans that are predicted, not guessed: what a LoRA step holds on the GPU, and which switches fit a card.

predict (memory of one plan from shapes: meta-device model, fake-tensor activations) -> choose (the plans, their
order, the first that fits) -> config (a composed train.py config: its plan, `trainer=auto`, the refusal).
`fusedit plan [--size full] [--gpu-gb N] [--json PATH] [train.py overrides]` prints and writes the prediction.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from fusedit.plan.choose import MARGIN, Choice, TrainPlan, choose, evaluate, plan_order
from fusedit.plan.predict import Estimates, ModelFacts, Prediction, model_facts, predict

# Host->GPU copy throughput of pinned memory over a x16 link (GB/s, practical, ~80 % of the link's 32 / 64 GB/s),
# for the transfer floor of a streaming plan. Assumed, not measured here.
PCIE_GBPS = {"pcie4_x16": 25.0, "pcie5_x16": 50.0}


_CARDS = ("H100", "A100", "RTX 4090", "L40S")


def compose_plan_config(overrides: list[str], size: str | None):
    """The train config for `overrides`; without `--size full` the defaults train() fills in (tiny model, sample
    data) are filled in too, since the prediction reads the model's configs and the data's image headers."""
    from hydra import compose, initialize_config_dir

    from fusedit.plan.config import CONF_DIR

    if not any(item.startswith("paths.root_dir=") for item in overrides):
        overrides = [f"paths.root_dir={os.getcwd()}", *overrides]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    if size != "full":
        from fusedit.data.sample import fill_demo_paths

        fill_demo_paths(cfg)
    return cfg


def plan_report(cfg, size: str | None, gpu_gb: float | None) -> dict:
    """The `fusedit plan` JSON: the chosen plan (trainer=auto) or the config's own, predicted for `gpu_gb`."""
    from fusedit.errors import UserInputError
    from fusedit.plan.config import config_facts, config_plan, detected_gpu_gb

    gpu_gb = gpu_gb or cfg.get("plan", {}).get("gpu_gb") or detected_gpu_gb()
    if gpu_gb is None:
        raise UserInputError("no CUDA GPU detected: pass --gpu-gb N to plan for a card of N GB")
    estimates = Estimates(cfg.plan.get("estimates") if cfg.get("plan") else None)
    facts = config_facts(cfg, size=size, estimates=estimates)
    auto = bool(cfg.get("plan", {}).get("auto", False))
    plan = config_plan(cfg)
    choice = choose(facts, estimates, gpu_gb, optim=plan.optim) if auto else evaluate(plan, facts, estimates, gpu_gb)
    from fusedit.bench.flops import PEAK_BF16_TFLOPS, step_flops

    moved = choice.prediction.moved_gb_per_step
    step_tflop = step_flops(facts.shape, facts.layout)["step"] / 1e12
    report = {
        **choice.to_dict(),
        "auto": auto,
        # Step-time floors: the transfer of the streamed blocks (overlapped with compute at best) and the compute at
        # the dense bf16 peak (checkpoint recomputation not counted, the MFU convention), per card.
        "host_to_gpu_floor_s": {link: round(moved / gbps, 3) for link, gbps in PCIE_GBPS.items()},
        "step_tflop": round(step_tflop, 1),
        "compute_floor_s": {name: round(step_tflop / peak, 3) for name, peak in PEAK_BF16_TFLOPS if name in _CARDS},
        "shape": facts.shape.to_dict(),
        "lora_parameters": facts.lora_parameters,
        "encoder_parameters": facts.encoder_parameters,
    }
    if not choice.fits and not auto:
        fitting = choose(facts, estimates, gpu_gb, optim=plan.optim)
        report["fits_with"] = fitting.plan.overrides() if fitting.fits else None
    return report


def run_plan(args: argparse.Namespace) -> int:
    from fusedit.io import write_json_atomic

    cfg = compose_plan_config(args.overrides, args.size)
    report = plan_report(cfg, args.size, args.gpu_gb)
    parts = ", ".join(f"{name} {value:.2f}" for name, value in report["parts_gb"].items())
    print(
        f"plan: {report['plan_description']}\n"
        f"  predicted peak GPU memory {report['predicted_peak_gpu_gb']:.2f} GB ({parts}) of {report['gpu_gb']:.1f} GB"
        f" (budget {report['budget_gb']:.1f} GB): {'fits' if report['fits'] else 'does NOT fit'}\n"
        f"  host (pinned) memory {report['predicted_host_gb']:.2f} GB, host->GPU "
        f"{report['host_to_gpu_gb_per_step']:.2f} GB per step (floor {report['host_to_gpu_floor_s']['pcie4_x16']:.2f} s"
        f" at PCIe 4.0 x16; compute floor {report['compute_floor_s']})\n"
        f"  overrides: {' '.join(report['plan_overrides'])}"
        + (f"\n  fits with: {' '.join(report['fits_with'])}" if report.get("fits_with") else "")
    )
    if args.json:
        write_json_atomic(Path(args.json), report)
    return 0 if report["fits"] else 1


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "plan",
        description="Compose the same config as `python train.py [overrides]` and predict, without loading weights, "
        "the peak GPU memory of its training step and the host memory it needs. With trainer=auto it shows the plan "
        "that train.py would choose. Exit 0 when the plan fits, 1 when it does not.",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/train.yaml, as for train.py")
    parser.add_argument(
        "--size",
        choices=["full"],
        default=None,
        help="full: the real Qwen-Image-Edit shapes (60 blocks, Qwen2.5-VL-7B, VAE) at 1024x1024 + one 1024x1024 "
        "edit image, built on the meta device (no files); default: model.path's configs and the data's largest bucket",
    )
    parser.add_argument(
        "--gpu-gb", type=float, default=None, help="plan for a card of this many GB (default: detected)"
    )
    parser.add_argument("--json", default=None, help="also write the report as JSON here")
    parser.set_defaults(func=run_plan)


__all__ = [
    "MARGIN",
    "Choice",
    "Estimates",
    "ModelFacts",
    "Prediction",
    "TrainPlan",
    "add_cli",
    "choose",
    "evaluate",
    "model_facts",
    "plan_order",
    "plan_report",
    "predict",
]
