"""`fusedit plan [--size full] [--gpu-gb N] [--json PATH] [train.py overrides]`: its parser and its run."""

from __future__ import annotations

import argparse
from pathlib import Path

from fusedit.plan.predict import DEFAULT_PCIE_GBPS, parse_bandwidth
from fusedit.train_config import compose_train_config


def _encode_line(encode: dict | None) -> str:
    """The encoding pass of a cache plan, one line (empty for live encoders)."""
    if encode is None:
        return ""
    seconds = "" if encode["s_per_row"] is None else f", ~{encode['s_per_row']:.2f} s per row"
    return (
        f"  encoding pass ({encode['mode']}): {encode['predicted_peak_gpu_gb']:.2f} GB on the GPU, "
        f"{encode['host_to_gpu_gb_per_row']:.2f} GB host->GPU per row{seconds}: "
        f"{'fits' if encode['fits'] else 'does NOT fit'}\n"
    )


def run_plan(args: argparse.Namespace) -> int:
    from fusedit.io import write_json_atomic
    from fusedit.plan.report import plan_report

    # The prediction reads the model's configs and the data's image headers: the demo ones unless --size full.
    cfg = compose_train_config(args.overrides, fill_demo=args.size != "full")
    report = plan_report(cfg, args.size, args.gpu_gb, args.pcie_gbps, family=args.family)
    parts = ", ".join(f"{name} {value:.2f}" for name, value in report["parts_gb"].items())
    print(
        f"plan: {report['plan_description']}\n"
        f"  predicted peak GPU memory {report['predicted_peak_gpu_gb']:.2f} GB ({parts}) of {report['gpu_gb']:.1f} GB"
        f" (budget {report['budget_gb']:.1f} GB): "
        f"{'fits' if report['predicted_peak_gpu_gb'] <= report['budget_gb'] else 'does NOT fit'}\n"
        f"  host (pinned) memory {report['predicted_host_gb']:.2f} GB, host->GPU "
        f"{report['host_to_gpu_gb_per_step']:.2f} GB per step (transfer floor {report['host_to_gpu_floor_s']:.2f} s"
        f" at {report['pcie_gbps']:g} GB/s; compute floor {report['compute_floor_s']})\n"
        + _encode_line(report.get("encode_phase"))
        + f"  overrides: {' '.join(report['plan_overrides'])}"
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
        "--family",
        choices=["qwen-image", "qwen-image-2.1"],
        default=None,
        help="with --size full: plan Qwen-Image-Edit's shapes (qwen-image) or Qwen-Image-2.1's (32 blocks of 4096, "
        "Qwen3-VL-8B, 64-channel VAE; 1024x1024 target + one 1024x1024 reference). Default: model.path's family "
        "when it is a pipeline folder, else qwen-image. Without --size full the family is model.path's",
    )
    parser.add_argument(
        "--gpu-gb", type=float, default=None, help="plan for a card of this many GB (default: detected)"
    )
    parser.add_argument(
        "--pcie-gbps",
        type=parse_bandwidth,
        default=DEFAULT_PCIE_GBPS,
        help="host->GPU GB/s for the transfer floor of a streaming plan: a number or pcie4_x16 (25, the default: "
        "RTX 4090, A100 PCIe) / pcie5_x16 (50: H100/H200 PCIe); practical pinned-copy rates, assumed",
    )
    parser.add_argument("--json", default=None, help="also write the report as JSON here")
    parser.set_defaults(func=run_plan)
