"""Training plans: the switches that decide memory, the order they are tried in, and the choice for a GPU.

A plan is five switches, each a config key `train.py` already has:

    checkpoint_every  model.activation_checkpointing    0 (off), 3, 2, 1: recompute every k-th block
    fp8               precision=fp8 vs precision=bf16    frozen base in float8_e4m3fn (half the weight bytes)
    cache             cache.enabled                      encode-then-train: encoders never share the GPU with a step
    optim             optim=adamw8bit vs optim=adamw     8-bit optimizer moments
    resident_blocks   model.resident_blocks              null, or N: stream the other blocks from host memory

`PLAN_ORDER` is the order `trainer=auto` tries them in, fastest first; each stage keeps the previous ones' switches
and adds one: everything resident (bf16, no checkpointing, live encoders) -> checkpoint every k-th block
(k = 3, 2, 1: least recomputation first) -> fp8 storage (again k = off, 3, 2, 1) -> encode-then-train from the
cache -> 8-bit optimizer states -> stream base blocks (as many resident as fit). The first plan whose predicted
peak is under `MARGIN` of the card wins. The margin (12.5 %: 70 of 80 GB, 21 of 24, 14 of 16, 10.5 of 12) covers
what the prediction leaves out: the CUDA context, workspaces and allocator fragmentation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass

from fusedit.plan.predict import Estimates, ModelFacts, Prediction, predict

MARGIN = 0.875  # a plan fits when its predicted peak is <= MARGIN * the card's memory
CHECKPOINT_LADDER = (0, 3, 2, 1)


@dataclass(frozen=True)
class TrainPlan:
    checkpoint_every: int = 0
    fp8: bool = False
    cache: bool = False
    optim: str = "adamw"
    resident_blocks: int | None = None
    encode_on_cpu: bool = False  # cache plans whose encoders alone do not fit the card encode on the CPU (one pass)

    def describe(self) -> str:
        parts = ["fp8 storage" if self.fp8 else "bf16"]
        parts.append(
            "no activation checkpointing"
            if not self.checkpoint_every
            else "checkpoint every block"
            if self.checkpoint_every == 1
            else f"checkpoint every {self.checkpoint_every}th block"
        )
        parts.append("encode-then-train (cache)" if self.cache else "live encoders on the GPU")
        if self.optim != "adamw":
            parts.append(f"optim={self.optim}")
        if self.resident_blocks is not None:
            parts.append(f"{self.resident_blocks} blocks resident, the rest streamed from host memory")
        if self.encode_on_cpu:
            parts.append("dataset encoded on the CPU first (the encoders alone exceed the card)")
        return ", ".join(parts)

    def overrides(self) -> list[str]:
        """The train.py overrides that set this plan."""
        return [
            f"precision={'fp8' if self.fp8 else 'bf16'}",
            f"model.activation_checkpointing={self.checkpoint_every}",
            f"cache.enabled={str(self.cache).lower()}",
            f"optim={self.optim}",
            f"model.resident_blocks={'null' if self.resident_blocks is None else self.resident_blocks}",
            *(["cache.device=cpu"] if self.encode_on_cpu else []),
        ]

    def to_dict(self) -> dict:
        return asdict(self)


def plan_order(num_blocks: int, eight_bit: bool = True, optim: str = "adamw") -> list[TrainPlan]:
    """Every plan in the order `trainer=auto` tries them (module docstring); streaming last, most resident first.
    `optim`: the run's optimizer, kept by every plan; only AdamW is switched to its 8-bit version, and not with
    `eight_bit=False` (bitsandbytes not installed). Another optimizer the user chose is never replaced."""
    low = "adamw8bit" if eight_bit and optim == "adamw" else optim
    plans = [TrainPlan(checkpoint_every=k, optim=optim) for k in CHECKPOINT_LADDER]
    plans += [TrainPlan(checkpoint_every=k, fp8=True, optim=optim) for k in CHECKPOINT_LADDER]
    plans += [TrainPlan(checkpoint_every=k, fp8=True, cache=True, optim=optim) for k in CHECKPOINT_LADDER]
    plans += [TrainPlan(checkpoint_every=1, fp8=True, cache=True, optim=low)] if low != optim else []
    plans += [
        TrainPlan(checkpoint_every=1, fp8=True, cache=True, optim=low, resident_blocks=resident)
        for resident in range(num_blocks - 1, -1, -1)
    ]
    return plans


@dataclass(frozen=True)
class Choice:
    plan: TrainPlan
    prediction: Prediction
    gpu_gb: float
    fits: bool
    tried: int  # plans predicted before this one was chosen

    def to_dict(self) -> dict:
        return {
            **self.prediction.to_dict(),
            "gpu_gb": round(self.gpu_gb, 2),
            "budget_gb": round(MARGIN * self.gpu_gb, 2),
            "fits": self.fits,
            "plan": self.plan.to_dict(),
            "plan_overrides": self.plan.overrides(),
            "plan_description": self.plan.describe(),
        }


def encode_phase_gb(facts: ModelFacts) -> float:
    """GPU memory of the encoding pass of encode-then-train: the text encoder and VAE weights (bf16); their
    activations at batch 1 are small next to them and not counted."""
    return facts.encoder_parameters * 2 / 1e9


def fits(prediction: Prediction, gpu_gb: float) -> bool:
    return prediction.peak_gpu_gb <= MARGIN * gpu_gb


def evaluate(plan: TrainPlan, facts: ModelFacts, estimates: Estimates, gpu_gb: float) -> Choice:
    """`plan` predicted for a `gpu_gb` card; a cache plan whose encoding pass (the encoders alone on the GPU) would
    not fit is switched to encoding on the CPU."""
    if plan.cache and not plan.encode_on_cpu and encode_phase_gb(facts) > MARGIN * gpu_gb:
        plan = dataclasses.replace(plan, encode_on_cpu=True)
    prediction = predict(
        facts,
        estimates,
        fp8=plan.fp8,
        checkpoint_every=plan.checkpoint_every,
        cache=plan.cache,
        optim=plan.optim,
        resident_blocks=plan.resident_blocks,
    )
    return Choice(plan, prediction, gpu_gb, fits(prediction, gpu_gb), 0)


def choose(
    facts: ModelFacts, estimates: Estimates, gpu_gb: float, eight_bit: bool | None = None, optim: str = "adamw"
) -> Choice:
    """The first plan of `plan_order` predicted to fit `gpu_gb`; if none does, the last one (fits=False).
    `eight_bit`: allow optim=adamw8bit (default: when bitsandbytes is installed); `optim`: the run's optimizer.

    The streaming tail is searched by bisection (the peak grows with the resident block count)."""
    if eight_bit is None:
        from fusedit.optim import bitsandbytes_available

        eight_bit = bitsandbytes_available()
    order = plan_order(facts.num_blocks, eight_bit, optim)
    streaming = [plan for plan in order if plan.resident_blocks is not None]
    for tried, plan in enumerate(order[: len(order) - len(streaming)]):
        choice = evaluate(plan, facts, estimates, gpu_gb)
        if choice.fits:
            return dataclasses.replace(choice, tried=tried)
    # streaming: resident counts descend, so the fitting ones form a tail; find its first element
    low, high = 0, len(streaming) - 1
    best = None
    while low <= high:
        middle = (low + high) // 2
        choice = evaluate(streaming[middle], facts, estimates, gpu_gb)
        if choice.fits:
            best, high = choice, middle - 1
        else:
            low = middle + 1
    if best is not None:
        return best
    return evaluate(streaming[-1], facts, estimates, gpu_gb)


def first_fitting_change(plan: TrainPlan, facts: ModelFacts, estimates: Estimates, gpu_gb: float) -> Choice | None:
    """For a plan that does not fit: the first plan in `plan_order` that fits (what to switch to), or None."""
    choice = choose(facts, estimates, gpu_gb, optim=plan.optim)
    return choice if choice.fits else None
