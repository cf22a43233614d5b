"""`fusedit plan`'s report: the chosen (or the config's own) plan, its predicted memory and its step-time floors."""

from __future__ import annotations

from fusedit.errors import UserInputError
from fusedit.plan.choose import choose, evaluate
from fusedit.plan.config import config_facts, config_plan, detected_gpu_gb
from fusedit.plan.predict import DEFAULT_PCIE_GBPS, Estimates

# The cards whose compute floor the report gives.
COMPUTE_FLOOR_CARDS = ("H100", "A100", "RTX 4090", "L40S")


def plan_report(
    cfg,
    size: str | None,
    gpu_gb: float | None,
    pcie_gbps: float = DEFAULT_PCIE_GBPS,
    estimates: Estimates | None = None,
    family: str | None = None,
) -> dict:
    """The `fusedit plan` JSON: the chosen plan (trainer=auto) or the config's own, predicted for `gpu_gb`; the
    transfer floor at `pcie_gbps` GB/s host->GPU (fusedit.plan.predict.PCIE_GBPS). `estimates`: default the
    config's `plan.estimates` file. `family`: which model `size="full"` plans for (fusedit.plan.config.config_facts)."""
    gpu_gb = gpu_gb or cfg.get("plan", {}).get("gpu_gb") or detected_gpu_gb()
    if gpu_gb is None:
        raise UserInputError("no CUDA GPU detected: pass --gpu-gb N to plan for a card of N GB")
    if estimates is None:
        estimates = Estimates(cfg.plan.get("estimates") if cfg.get("plan") else None)
    facts = config_facts(cfg, size=size, estimates=estimates, family=family)
    auto = bool(cfg.get("plan", {}).get("auto", False))
    plan = config_plan(cfg)
    choice = (
        choose(facts, estimates, gpu_gb, pcie_gbps=pcie_gbps, optim=plan.optim, ema=plan.ema)
        if auto
        else evaluate(plan, facts, estimates, gpu_gb, pcie_gbps=pcie_gbps)
    )
    # Here, not at the top: the package imports this module, and train.py's plan check (plan.config) needs none of
    # what bench.flops brings in (the LoRA targets, the convert package).
    from fusedit.bench.flops import PEAK_BF16_TFLOPS, step_flops

    moved = choice.prediction.moved_gb_per_step
    step_tflop = step_flops(facts.shape, facts.layout)["step"] / 1e12
    report = {
        **choice.to_dict(),
        "auto": auto,
        # Step-time floors: the transfer of the streamed blocks (overlapped with compute at best) and the compute at
        # the dense bf16 peak (checkpoint recomputation not counted, the MFU convention), per card.
        "pcie_gbps": pcie_gbps,
        "host_to_gpu_floor_s": round(moved / pcie_gbps, 3),
        "step_tflop": round(step_tflop, 1),
        "compute_floor_s": {
            name: round(step_tflop / peak, 3) for name, peak in PEAK_BF16_TFLOPS if name in COMPUTE_FLOOR_CARDS
        },
        "shape": facts.shape.to_dict(),
        "lora_parameters": facts.lora_parameters,
        "encoder_parameters": facts.encoder_parameters,
    }
    if not choice.fits and not auto:
        fitting = choose(facts, estimates, gpu_gb, pcie_gbps=pcie_gbps, optim=plan.optim, ema=plan.ema)
        report["fits_with"] = fitting.plan.overrides() if fitting.fits else None
    return report
