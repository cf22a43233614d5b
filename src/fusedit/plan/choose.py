"""Training plans: the switches that decide memory, the order they are tried in, and the choice for a GPU.

A plan is a handful of switches, each a config key `train.py` already has:

    checkpoint_every  model.activation_checkpointing    0 (off), 3, 2, 1: recompute every k-th block
    fp8               precision=fp8 vs precision=bf16    frozen base in float8_e4m3fn (half the weight bytes)
                      (precision=fp32, `fp32`, is predicted when a config asks for it; trainer=auto never picks it)
    cache             cache.enabled                      encode-then-train: encoders never share the GPU with a step
    optim             optim=adamw8bit vs optim=adamw     8-bit optimizer moments
    resident_blocks   model.resident_blocks              null, or N: stream the other blocks from host memory
    ema               callbacks=ema                      the EMA copy of the LoRA; kept from the config, never switched
    encode            cache.offload / cache.device=cpu   where a cache plan's encoding pass runs (`encode_phase`):
                                                         "gpu" (the encoders on the GPU alone), "offload" (the text
                                                         encoder's layers streamed from host memory), "cpu"

`PLAN_ORDER` is the order `trainer=auto` tries them in, fastest first; each stage keeps the previous ones' switches
and adds one: everything resident (bf16, no checkpointing, live encoders) -> checkpoint every k-th block
(k = 3, 2, 1: least recomputation first) -> fp8 storage (again k = off, 3, 2, 1) -> encode-then-train from the
cache -> 8-bit optimizer states -> stream base blocks (as many resident as fit). The first plan whose predicted
peak is under `MARGIN` of the card wins. The margin (12.5 %: 70 of 80 GB, 21 of 24, 14 of 16, 10.5 of 12) covers
what the prediction leaves out: the CUDA context, workspaces and allocator fragmentation. A cache plan must fit
twice: its training step, and its encoding pass before it (`encode_phase`); trainer=auto encodes on the GPU when
the encoders fit there, else with the text encoder offloaded layer by layer, else on the CPU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass

from fusedit.plan.predict import DEFAULT_PCIE_GBPS, GB, Estimates, ModelFacts, Prediction, predict

MARGIN = 0.875  # a plan fits when its predicted peak is <= MARGIN * the card's memory
CHECKPOINT_LADDER = (0, 3, 2, 1)
ENCODE_MODES = ("gpu", "offload", "cpu")  # fastest first
# Dense bf16 throughput assumed for encoding on the CPU (a many-core AVX-512 / AMX server); a rough figure for the
# time estimate of encode="cpu", not measured here.
CPU_ENCODE_TFLOPS = 0.5


@dataclass(frozen=True)
class TrainPlan:
    checkpoint_every: int = 0
    fp8: bool = False
    cache: bool = False
    optim: str = "adamw"
    resident_blocks: int | None = None
    encode: str = "gpu"  # a cache plan's encoding pass: ENCODE_MODES
    fp32: bool = False  # precision=fp32: fp32 base, encoders and activations, no autocast
    ema: bool = False  # callbacks=ema: an averaged copy of the LoRA parameters (fusedit.plan.predict)

    @property
    def precision(self) -> str:
        """The conf/precision preset of this plan."""
        return "fp8" if self.fp8 else "fp32" if self.fp32 else "bf16"

    def describe(self) -> str:
        parts = ["fp8 storage" if self.fp8 else "fp32" if self.fp32 else "bf16"]
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
        if self.ema:
            parts.append("EMA of the LoRA")
        if self.resident_blocks is not None:
            parts.append(f"{self.resident_blocks} blocks resident, the rest streamed from host memory")
        if self.cache and self.encode == "offload":
            parts.append("dataset encoded first with the text encoder streamed from host memory layer by layer")
        elif self.cache and self.encode == "cpu":
            parts.append("dataset encoded on the CPU first")
        return ", ".join(parts)

    def overrides(self) -> list[str]:
        """The train.py overrides that set this plan."""
        return [
            f"precision={self.precision}",
            f"model.activation_checkpointing={self.checkpoint_every}",
            f"cache.enabled={str(self.cache).lower()}",
            f"optim={self.optim}",
            f"model.resident_blocks={'null' if self.resident_blocks is None else self.resident_blocks}",
            *(["cache.offload=true"] if self.cache and self.encode == "offload" else []),
            *(["cache.device=cpu"] if self.cache and self.encode == "cpu" else []),
        ]

    def to_dict(self) -> dict:
        return asdict(self)


def plan_order(num_blocks: int, eight_bit: bool = True, optim: str = "adamw", ema: bool = False) -> list[TrainPlan]:
    """Every plan in the order `trainer=auto` tries them (module docstring); streaming last, most resident first.
    `optim`: the run's optimizer, kept by every plan; only AdamW is switched to its 8-bit version, and not with
    `eight_bit=False` (bitsandbytes not installed). Another optimizer the user chose is never replaced. `ema`
    (callbacks=ema) is kept by every plan."""
    low = "adamw8bit" if eight_bit and optim == "adamw" else optim
    plans = [TrainPlan(checkpoint_every=k, optim=optim) for k in CHECKPOINT_LADDER]
    plans += [TrainPlan(checkpoint_every=k, fp8=True, optim=optim) for k in CHECKPOINT_LADDER]
    plans += [TrainPlan(checkpoint_every=k, fp8=True, cache=True, optim=optim) for k in CHECKPOINT_LADDER]
    plans += [TrainPlan(checkpoint_every=1, fp8=True, cache=True, optim=low)] if low != optim else []
    plans += [
        TrainPlan(checkpoint_every=1, fp8=True, cache=True, optim=low, resident_blocks=resident)
        for resident in range(num_blocks - 1, -1, -1)
    ]
    return [dataclasses.replace(plan, ema=ema) for plan in plans]


@dataclass(frozen=True)
class EncodePhase:
    """The encoding pass of an encode-then-train plan (fusedit.cache fills the cache before step 1), per row.

    peak_gpu_gb: weights on the GPU (activations at batch 1 are small next to them and not counted).
    host_to_gpu_gb_per_row: the offloaded text encoder crosses the bus once per row (it encodes one prompt at a
    time). s_per_row: "offload": the transfer floor at `pcie_gbps`; "cpu": a rough estimate, 2 x text-encoder
    parameters x prompt tokens at CPU_ENCODE_TFLOPS (the VAE not counted); "gpu": None (compute-bound, fast).
    """

    mode: str
    peak_gpu_gb: float
    host_to_gpu_gb_per_row: float
    s_per_row: float | None
    fits: bool

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "predicted_peak_gpu_gb": round(self.peak_gpu_gb, 2),
            "host_to_gpu_gb_per_row": round(self.host_to_gpu_gb_per_row, 2),
            "s_per_row": None if self.s_per_row is None else round(self.s_per_row, 2),
            "fits": self.fits,
        }


def encode_phase(
    facts: ModelFacts, mode: str, gpu_gb: float, fp32: bool = False, pcie_gbps: float = DEFAULT_PCIE_GBPS
) -> EncodePhase:
    """The encoding pass in `mode` (ENCODE_MODES) for a `gpu_gb` card. "offload" holds the VAE and two of the text
    encoder's largest layers (the one running and the one prefetched: EditConditioner.offload_text_encoder)."""
    width = 4 if fp32 else 2
    text_parameters = facts.encoder_parameters - facts.vae_parameters
    if mode == "gpu":
        peak, moved, seconds = facts.encoder_parameters * width / GB, 0.0, None
    elif mode == "offload":
        peak = (facts.vae_parameters + 2 * facts.encoder_largest_leaf) * width / GB
        moved = text_parameters * width / GB
        seconds = moved / pcie_gbps
    elif mode == "cpu":
        peak, moved = 0.0, 0.0
        seconds = 2 * text_parameters * facts.shape.text_tokens / (CPU_ENCODE_TFLOPS * 1e12)
    else:
        raise ValueError(f"encode mode must be one of {ENCODE_MODES}, got {mode!r}")
    return EncodePhase(mode, peak, moved, seconds, peak <= MARGIN * gpu_gb)


@dataclass(frozen=True)
class Choice:
    plan: TrainPlan
    prediction: Prediction
    gpu_gb: float
    fits: bool  # the training step fits, and so does the encoding pass of a cache plan
    tried: int  # plans predicted before this one was chosen
    encode: EncodePhase | None = None  # cache plans only

    def to_dict(self) -> dict:
        return {
            **self.prediction.to_dict(),
            "gpu_gb": round(self.gpu_gb, 2),
            "budget_gb": round(MARGIN * self.gpu_gb, 2),
            "fits": self.fits,
            "encode_phase": None if self.encode is None else self.encode.to_dict(),
            "plan": self.plan.to_dict(),
            "plan_overrides": self.plan.overrides(),
            "plan_description": self.plan.describe(),
        }


def fits(prediction: Prediction, gpu_gb: float) -> bool:
    return prediction.peak_gpu_gb <= MARGIN * gpu_gb


def evaluate(
    plan: TrainPlan,
    facts: ModelFacts,
    estimates: Estimates,
    gpu_gb: float,
    adapt_encode: bool = False,
    pcie_gbps: float = DEFAULT_PCIE_GBPS,
) -> Choice:
    """`plan` predicted for a `gpu_gb` card, its encoding pass too when it trains from the cache. `adapt_encode`
    (trainer=auto): a cache plan's encoding pass moves down ENCODE_MODES from `plan.encode` to the first that fits."""
    encode = None
    if plan.cache:
        modes = ENCODE_MODES[ENCODE_MODES.index(plan.encode) :] if adapt_encode else (plan.encode,)
        for mode in modes:
            encode = encode_phase(facts, mode, gpu_gb, plan.fp32, pcie_gbps)
            if encode.fits:
                break
        plan = dataclasses.replace(plan, encode=encode.mode)
    prediction = predict(
        facts,
        estimates,
        fp8=plan.fp8,
        checkpoint_every=plan.checkpoint_every,
        cache=plan.cache,
        optim=plan.optim,
        resident_blocks=plan.resident_blocks,
        fp32=plan.fp32,
        ema=plan.ema,
    )
    return Choice(plan, prediction, gpu_gb, fits(prediction, gpu_gb) and (encode is None or encode.fits), 0, encode)


def choose(
    facts: ModelFacts,
    estimates: Estimates,
    gpu_gb: float,
    eight_bit: bool | None = None,
    pcie_gbps: float = DEFAULT_PCIE_GBPS,
    optim: str = "adamw",
    ema: bool = False,
) -> Choice:
    """The first plan of `plan_order` predicted to fit `gpu_gb`; if none does, the last one (fits=False).
    `eight_bit`: allow optim=adamw8bit (default: when bitsandbytes is installed); `optim`: the run's optimizer;
    `ema`: whether the run keeps an EMA of the LoRA (callbacks=ema).

    The streaming tail is searched by bisection (the peak grows with the resident block count)."""
    if eight_bit is None:
        from fusedit.optim import bitsandbytes_available

        eight_bit = bitsandbytes_available()
    order = plan_order(facts.num_blocks, eight_bit, optim, ema)
    streaming = [plan for plan in order if plan.resident_blocks is not None]
    for tried, plan in enumerate(order[: len(order) - len(streaming)]):
        choice = evaluate(plan, facts, estimates, gpu_gb, True, pcie_gbps)
        if choice.fits:
            return dataclasses.replace(choice, tried=tried)
    # streaming: resident counts descend, so the fitting ones form a tail; find its first element
    low, high = 0, len(streaming) - 1
    best = None
    while low <= high:
        middle = (low + high) // 2
        choice = evaluate(streaming[middle], facts, estimates, gpu_gb, True, pcie_gbps)
        if choice.fits:
            best, high = choice, middle - 1
        else:
            low = middle + 1
    if best is not None:
        return best
    return evaluate(streaming[-1], facts, estimates, gpu_gb, True, pcie_gbps)


def first_fitting_change(plan: TrainPlan, facts: ModelFacts, estimates: Estimates, gpu_gb: float) -> Choice | None:
    """For a plan that does not fit: the first plan in `plan_order` that fits (what to switch to), or None."""
    choice = choose(facts, estimates, gpu_gb, optim=plan.optim, ema=plan.ema)
    return choice if choice.fits else None
