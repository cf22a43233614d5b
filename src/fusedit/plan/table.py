"""The per-profile prediction table of docs/performance.md, from the planner itself (so the doc cannot drift: a test
compares them).

    python -m fusedit.plan.table [ESTIMATES_JSON]   # prints the markdown table (full shape; ~2 min without a cache)
    python -m fusedit.plan.table --family qwen-image-2.1 [ESTIMATES_JSON]   # the same at Qwen-Image-2.1's full shape
"""

from __future__ import annotations

import argparse

from fusedit.plan.predict import DEFAULT_PCIE_GBPS, Estimates

# trainer profile -> the card it is set for (GB)
PROFILE_CARDS = {"a100": 80, "h100": 80, "rtx4090": 24, "16gb": 16, "12gb": 12}


def profiles_table(estimates: Estimates, pcie_gbps: float = DEFAULT_PCIE_GBPS, family: str | None = None) -> str:
    """Markdown: each GPU profile's plan predicted at the full shape on its card (fusedit.plan.plan_report), of
    Qwen-Image-Edit or (`family="qwen-image-2.1"`) Qwen-Image-2.1."""
    from fusedit.plan.report import plan_report
    from fusedit.train_config import compose_train_config

    lines = [
        "| profile | card GB | plan | predicted peak GB (transformer + lora + activations + encoders) | host GB | "
        f"host->GPU GB/step | transfer floor at {pcie_gbps:g} GB/s | encoding pass (GB on the GPU) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for profile, card_gb in PROFILE_CARDS.items():
        cfg = compose_train_config([f"trainer={profile}"], fill_demo=False)
        report = plan_report(cfg, "full", card_gb, pcie_gbps, estimates, family=family)
        parts = " + ".join(f"{value:.2f}" for value in report["parts_gb"].values())
        encode = report["encode_phase"]
        encoding = (
            "– (encoders live)" if encode is None else f"{encode['mode']} ({encode['predicted_peak_gpu_gb']:.2f})"
        )
        floor = f"{report['host_to_gpu_floor_s']:.2f} s" if report["host_to_gpu_gb_per_step"] else "–"
        lines.append(
            f"| `{profile}` | {card_gb} | {report['plan_description']} | **{report['predicted_peak_gpu_gb']:.2f}** "
            f"({parts}) | {report['predicted_host_gb']:.2f} | {report['host_to_gpu_gb_per_step']:.2f} | {floor} | "
            f"{encoding} |"
        )
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fusedit.plan.table", description=__doc__.splitlines()[0])
    parser.add_argument("estimates", nargs="?", default=None, help="the planner's estimate cache (JSON) to reuse")
    parser.add_argument("--family", choices=["qwen-image", "qwen-image-2.1"], default=None, help="default qwen-image")
    return parser


if __name__ == "__main__":
    arguments = build_parser().parse_args()
    print(profiles_table(Estimates(arguments.estimates), family=arguments.family), end="")
