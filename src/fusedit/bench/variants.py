"""The benchmark variants: each one is the same random model put through a different set of build stages.

A variant's name is its recipe: a layout followed by `+`-joined modifiers, e.g. `merged+compile+fp8+ckpt`.

    layout     standard   diffusers' unfused model, PEFT LoRA on to_q, to_k, to_v, add_q_proj, ...
               merged     merged QKV (fuse_qkv), LoRA on to_qkv, add_qkv_proj, ...
    modifiers  compile    regional torch.compile of the repeated block
               fp8        frozen base stored in float8_e4m3fn, bf16 GEMMs (memory)
               float8     frozen base computing in float8 GEMMs, sm89+ GPUs only (speed); not with fp8
               ckpt       activation checkpointing of every block; ckptN: of every N-th block
               offload    the checkpointed blocks' saved inputs held in CPU memory (needs ckpt / ckptN)
               mask       the all-ones prompt mask is passed to the model instead of trimmed to None

A Qwen-Image-2.1 variant carries the family prefix `2.1:` (`2.1:standard`, `2.1:merged+ckpt`): the same recipe on
diffusers' `QwenImage21Transformer2DModel`, where `merged` merges q/k/v into `to_qkv` and the SwiGLU's gate/up into
`img_mlp.gate_up_proj` (fusedit.model.merged_qwen21: 5 -> 2 projections per block) and `standard` is the unfused
model. Its speedups are against the 2.1 baseline of the same run, never the MMDiT's.

Modifiers may come in any order; the name is reported in the order above (`merged+ckpt+compile` is
`merged+compile+ckpt`, `ckpt1` is `ckpt`). The model is built by the trainer's build stages (fusedit.step.build:
load -> fuse -> fp8 -> LoRA -> activation checkpointing -> compile) in the trainer's precision config for the
bench's dtype, and `make_step` is the trainer's step (fusedit.step.loss under the same autocast): what a variant is
timed (fusedit.bench.run) and predicted (fusedit.bench.memory) on is what `train.py` runs with that config.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fusedit.bench.shapes import FAMILIES, MMDIT, QWEN21, BenchShape, build_random_transformer
from fusedit.devices import to_dtype
from fusedit.errors import UserInputError
from fusedit.model.fp8 import float8_compute_support
from fusedit.step.build import build_transformer
from fusedit.step.conditioning import EditInputs
from fusedit.step.config import LoraSpec, ModelConfig
from fusedit.step.loss import EditLoss
from fusedit.step.objective import FlowMatchObjective
from fusedit.step.precision import PRESETS, Precision

LAYOUTS = {"standard": "standard", "merged": "merged_qkv"}  # name token -> fusedit layout
MODIFIERS = ("compile", "fp8", "float8", "ckpt", "ckptN", "offload", "mask")
_CKPT = re.compile(r"ckpt(\d*)")
# family -> the prefix of its variant names ("" for the MMDiT, so that every name from before 2.1 keeps its meaning)
FAMILY_PREFIX = {MMDIT: "", QWEN21: "2.1:"}


@dataclass(frozen=True)
class Variant:
    name: str
    layout: str = "merged_qkv"  # "standard": diffusers' unfused model, PEFT on to_q, to_k, to_v, ...
    compile: bool = False
    fp8: str = "none"  # "storage" (float8_e4m3fn weights, bf16 GEMMs) or "float8" (float8 GEMMs, sm89+)
    checkpoint_every: int = 0
    offload: bool = False
    keep_mask: bool = False  # pass the all-ones prompt mask instead of trimming it to None
    description: str = ""
    family: str = MMDIT  # fusedit.bench.shapes.FAMILIES: which transformer (and shape) the variant steps

    def unsupported(self, device: torch.device) -> str | None:
        """Why this variant cannot run on `device`, or None."""
        if self.fp8 == "float8":
            supported, reason = float8_compute_support(device)
            return None if supported else reason
        return None


def _grammar() -> str:
    return (
        f"a variant is a layout ({' | '.join(LAYOUTS)}) followed by '+'-joined modifiers from "
        f"{{{', '.join(MODIFIERS)}}}, e.g. merged+compile+fp8+ckpt"
    )


def _ordinal(n: int) -> str:
    suffix = "th" if n % 100 in (11, 12, 13) else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _describe(layout: str, compile: bool, fp8: str, every: int, offload: bool, mask: bool, family: str = MMDIT) -> str:
    merged = (
        "merged q/k/v and SwiGLU gate/up + LoRA on the merged projections"
        if family == QWEN21
        else "merged QKV + LoRA on the merged projections"
    )
    parts = [
        "diffusers' unfused model + PEFT" if layout == "standard" else merged,
        "regional torch.compile of the block" if compile else "eager",
    ]
    if family == QWEN21:
        parts.insert(0, "Qwen-Image-2.1")
    if fp8 == "storage":
        parts.append("fp8 storage of the frozen base (bf16 GEMMs)")
    elif fp8 == "float8":
        parts.append("float8 GEMMs for the frozen base (sm89+)")
    if every:
        parts.append("every block checkpointed" if every == 1 else f"every {_ordinal(every)} block checkpointed")
    if offload:
        parts.append("checkpoints offloaded to CPU")
    if mask:
        parts.append("all-ones prompt mask passed (not trimmed)")
    return ", ".join(parts)


def _canonical_name(layout: str, compile: bool, fp8: str, every: int, offload: bool, mask: bool) -> str:
    """The name a variant is reported under: its modifiers in the order of the module docstring's table."""
    canonical = [layout]
    canonical += ["compile"] if compile else []
    canonical += {"storage": ["fp8"], "float8": ["float8"]}.get(fp8, [])
    canonical += ["ckpt" if every == 1 else f"ckpt{every}"] if every else []
    canonical += ["offload"] if offload else []
    canonical += ["mask"] if mask else []
    return "+".join(canonical)


def variant_family(name: str) -> tuple[str, str]:
    """(family, the name without its family prefix) of a variant name."""
    name = name.strip()
    for family, prefix in FAMILY_PREFIX.items():
        if prefix and name.startswith(prefix):
            return family, name.removeprefix(prefix)
    return MMDIT, name


def parse_variant(name: str, family: str | None = None) -> Variant:
    """One variant from its name (see the module docstring); a ValueError names the bad token. `family`: the family
    of a name without a prefix (default the MMDiT's)."""
    prefixed, recipe = variant_family(name)
    if prefixed == MMDIT and family is not None:
        if family not in FAMILIES:
            raise UserInputError(f"benchmark family must be one of {', '.join(FAMILIES)}, got {family!r}")
        prefixed = family
    variant = _parse_recipe(recipe, name)
    prefix = FAMILY_PREFIX[prefixed]
    return dataclasses.replace(
        variant,
        name=prefix + variant.name,
        family=prefixed,
        description=_describe(
            variant.name.split("+")[0], variant.compile, variant.fp8, variant.checkpoint_every, variant.offload,
            variant.keep_mask, prefixed,
        ),
    )  # fmt: skip


def _parse_recipe(recipe: str, name: str) -> Variant:
    tokens = [token.strip() for token in recipe.strip().split("+")]
    if tokens[0] not in LAYOUTS:
        raise UserInputError(
            f"benchmark variant {name!r}: it must start with a layout, got {tokens[0]!r}; {_grammar()}"
        )
    layout = LAYOUTS[tokens[0]]
    compile = offload = mask = False
    fp8, every, checkpoint_token, seen = "none", 0, None, set()
    for token in tokens[1:]:
        if token in seen:
            raise UserInputError(f"benchmark variant {name!r}: modifier {token!r} given twice")
        seen.add(token)
        ckpt = _CKPT.fullmatch(token)
        if token == "compile":
            compile = True
        elif token in ("fp8", "float8"):
            if fp8 != "none":
                raise UserInputError(
                    f"benchmark variant {name!r}: 'fp8' (fp8 storage, bf16 GEMMs) and 'float8' (float8 GEMMs, "
                    "which store the weights in fp8 too) both fill the fp8 slot; choose one"
                )
            fp8 = "storage" if token == "fp8" else "float8"
        elif ckpt:
            if checkpoint_token is not None:
                raise UserInputError(
                    f"benchmark variant {name!r}: {checkpoint_token!r} and {token!r} both set the checkpoint "
                    "interval; choose one"
                )
            every = int(ckpt.group(1) or 1)
            if every < 1:
                raise UserInputError(
                    f"benchmark variant {name!r}: {token!r} checkpoints no block; leave the ckpt modifier out instead"
                )
            checkpoint_token = token
        elif token == "offload":
            offload = True
        elif token == "mask":
            mask = True
        elif not token:
            raise UserInputError(f"benchmark variant {name!r}: empty modifier (a '+' too many); {_grammar()}")
        else:
            raise UserInputError(f"benchmark variant {name!r}: unknown modifier {token!r}; {_grammar()}")
    if offload and not every:
        raise UserInputError(
            f"benchmark variant {name!r}: 'offload' moves activation checkpoints to the CPU and needs 'ckpt' or "
            "'ckptN' in the same variant"
        )
    return Variant(
        name=_canonical_name(tokens[0], compile, fp8, every, offload, mask),
        layout=layout,
        compile=compile,
        fp8=fp8,
        checkpoint_every=every,
        offload=offload,
        keep_mask=mask,
        description=_describe(tokens[0], compile, fp8, every, offload, mask),
    )


# The named set that `--variants all` runs (any other combination can be asked for by name).
CATALOGUE = (
    "standard",
    "standard+ckpt",
    "merged",
    "merged+mask",
    "merged+compile",
    "merged+compile+fp8",
    "merged+compile+float8",
    "merged+ckpt",
    "merged+ckpt2",
    "merged+ckpt+offload",
    "merged+compile+ckpt",
)
VARIANTS = {name: parse_variant(name) for name in CATALOGUE}

# Per size, what `fusedit bench` runs without --variants. `full` lists only variants expected to fit on an 80 GB
# GPU, most important first so that a time budget cuts the least important ones: the checkpointed baseline, the
# headline stack, then the fp8 and fewer-checkpoint variants. The GB are the recorded `--estimate-only` predictions
# (BENCHMARKS.md); compiled variants are predicted eagerly, an upper bound.
DEFAULT_VARIANTS = {
    "tiny": (
        "standard",
        "merged",
        "merged+mask",
        "merged+compile",
        "merged+compile+fp8",
        "merged+compile+float8",
        "merged+ckpt",
        "merged+ckpt+offload",
    ),
    "full": (
        "standard+ckpt",  # the baseline: the stock trainers' setting (46.8 GB predicted)
        "merged+compile+ckpt",  # the headline stack (<= 46.7 GB predicted)
        "merged+ckpt",  # QKV merging alone at equal recomputation
        "merged+compile+fp8+ckpt",  # the memory target (<= 26.4 GB predicted)
        "merged+compile+float8+ckpt",  # float8 GEMMs (sm89+)
        "merged+compile+ckpt2",  # half the recomputation in bf16 (<= 80.0 GB predicted: the tightest)
        "merged+compile+float8+ckpt3",  # a third of the recomputation on fp8 weights (<= 71.1 GB predicted)
    ),
}

# Qwen-Image-2.1's per size (names without the `2.1:` prefix): at `tiny` the two layouts side by side (about 8 s
# more on a 2-core CPU); at `full` the checkpointed baseline first, then QKV + gate/up merging at equal recomputation,
# then the headline stack, and the unfused pair last (most likely cut by a time budget).
QWEN21_DEFAULT_VARIANTS = {
    "tiny": ("standard", "merged"),
    "full": ("standard+ckpt", "merged+ckpt", "merged+compile+ckpt", "standard", "merged"),
}
# family -> size -> the variants `fusedit bench --family F` runs without --variants
FAMILY_DEFAULT_VARIANTS = {MMDIT: DEFAULT_VARIANTS, QWEN21: QWEN21_DEFAULT_VARIANTS}

# The speedup column is against the first of these that ran: plain `standard` is what a user of the stock scripts
# gets, `standard+ckpt` what they get when the model does not fit without checkpointing (the full shape, 80 GB).
# Per family: a 2.1 variant is compared with `2.1:standard` (or `2.1:standard+ckpt`).
BASELINES = ("standard", "standard+ckpt")


def family_baselines(family: str) -> tuple[str, ...]:
    return tuple(FAMILY_PREFIX[family] + name for name in BASELINES)


def default_variants(size: str, families: tuple[str, ...] = (MMDIT,)) -> list[str]:
    """The variant names `fusedit bench --size size` runs for `families` without --variants (prefixed)."""
    return [FAMILY_PREFIX[family] + name for family in families for name in FAMILY_DEFAULT_VARIANTS[family][size]]


def parse_variants(text: str | list[str] | tuple[str, ...], families: tuple[str, ...] = (MMDIT,)) -> list[Variant]:
    """Variants from a comma-separated string or a list of names; `all` expands to CATALOGUE; duplicates (also
    spelled differently, e.g. `merged+ckpt+compile` and `merged+compile+ckpt`) run once. A name without a family
    prefix stands for that recipe in each of `families` (`--family`); `2.1:merged` is 2.1's whatever `families`."""
    names = [name.strip() for name in (text.split(",") if isinstance(text, str) else text) if name.strip()]
    if not names:
        raise UserInputError(f"no benchmark variant given; {_grammar()}, or 'all' (= {', '.join(CATALOGUE)})")
    variants = {}
    for name in names:
        family, recipe = variant_family(name)
        wanted = families if family == MMDIT else (family,)
        recipes = CATALOGUE if recipe == "all" else (recipe,)
        for each in wanted:
            for one in recipes:
                variant = parse_variant(one, each)
                variants.setdefault(variant.name, variant)
    return list(variants.values())


# The trainer's precision configs a bench `--dtype` stands for: bf16 is `precision=bf16` (fp32 adapters under bf16
# autocast), fp32 is `precision=fp32`; fp16 has no preset and runs as Lightning's `16-true` would (all fp16).
BENCH_PRECISIONS = {
    torch.float32: PRESETS["fp32"],
    torch.bfloat16: PRESETS["bf16"],
    torch.float16: Precision(
        name="fp16", base_dtype="float16", lora_dtype="float16", lightning="16-true", compute_dtype="float16"
    ),
}


def variant_precision(variant: Variant, dtype: torch.dtype) -> Precision:
    """The precision config `train.py` would run `variant` in at `dtype` (the variant's fp8 choice included)."""
    return dataclasses.replace(BENCH_PRECISIONS[dtype], fp8=variant.fp8)


def build_variant(
    variant: Variant, shape: BenchShape, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> nn.Module:
    """The trainable model for `variant`: random base (same for every variant) in `dtype`, then the trainer's build
    stages (fusedit.step.build) with the trainer's precision config for `dtype` (`variant_precision`)."""
    precision = variant_precision(variant, dtype)
    base = build_random_transformer(shape, device, to_dtype(precision.base_dtype), seed)
    model = ModelConfig(
        layout=variant.layout,
        activation_checkpointing=variant.checkpoint_every,
        checkpoint_offload=variant.offload,
        compile=variant.compile,
    )
    return build_transformer(base, model, LoraSpec(shape.lora_targets, rank=shape.lora_rank), precision, device)


def make_step(
    model: nn.Module,
    inputs: EditInputs,
    variant: Variant,
    optimizer: torch.optim.Optimizer,
    objective: FlowMatchObjective,
    dtype: torch.dtype,
    seed: int = 0,
) -> Callable[[], torch.Tensor]:
    """The trainer's optimizer step on `inputs` (what Lightning runs for `EditLoRAModule.training_step`): the
    loss (fusedit.step.loss.EditLoss, noise drawn from `seed`) under the precision config's autocast, backward
    outside it, optimizer step, gradients set to None. Returns a function that runs one step and returns the loss."""
    edit_loss = EditLoss(objective, trim_padding=not variant.keep_mask)
    autocast = variant_precision(variant, dtype).autocast
    device = inputs.target.device

    def step() -> torch.Tensor:
        with autocast(device):
            loss, _ = edit_loss.loss(model, inputs, seed)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step
