"""LoKr and LoHa (`lora.type=lokr|loha`, PEFT's LoKrConfig / LoHaConfig) on either QKV layout, and their export.

The updates (PEFT, after LyCORIS; s = alpha / r):

- LoHa: dW = s * (w1a @ w1b) * (w2a @ w2b)  (Hadamard product; w1a, w2a [out, r], w1b, w2b [r, in]).
- LoKr: dW = s * kron(w1, w2)  (w1 [a, c], w2 [b, d], out = a * b, in = c * d; either factor may be low-rank,
  w1 = w1_a @ w1_b, w2 = w2_a @ w2_b, rank r).

On the merged `to_qkv` (the rows of q, k and v stacked, [3n, in]) one adapter covers all three projections.
Its update's row blocks are the q/k/v updates, and:

- LoHa: rows of a Hadamard product of two products are (w1a[rows] @ w1b) * (w2a[rows] @ w2b): each of q/k/v is a
  LoHa of the same rank with the right factors w1b, w2b shared (copied). Training on to_qkv is LoHa on q/k/v with
  shared right factors; the standard-layout export is exact.
- LoKr: row i of kron(w1, w2) is row i // b of w1 times row i % b of w2. When 3 divides a, the block of rows of
  part k is kron(w1[k a/3 : (k+1) a/3], w2): q/k/v are LoKr adapters sharing w2 (exact export). When a = 1 it is
  kron(w1, w2[k b/3 : (k+1) b/3]) (exact too). Otherwise a block cuts through w1's rows, and a part is no
  Kronecker product of the same shape: such a run is refused before the model loads (config validation, from the
  transformer's config.json) and again when the adapter is added (`check_exact_split`), naming the
  `lora.decompose_factor` that makes a divisible by 3 (PEFT puts `decompose_factor` rows in w1 when it divides
  out). Qwen-Image's to_qkv ([9216, 3072]) gets a = 96 by PEFT's default factorisation: exact.

The same holds for any merged group (Qwen-Image-2.1's gate_up_proj splits in 2). Files are written with ComfyUI's
keys for these adapters (`diffusion_model.<module>.lokr_w1` / `.hada_w1_a` ..., and `.alpha`), which ComfyUI's
Qwen-Image loader applies (LyCORIS' names); the strength goes into the `.alpha` tensor as ComfyUI reads it
(alpha / rank of a low-rank factor), or into w1 for a LoKr without a low-rank factor (ComfyUI applies those
unscaled, as LyCORIS does). `read_lycoris` reads such a file back with that rule (`comfyui_scale`): infer.py
applies it from there (fusedit.inference.lora), and the export tests decode with it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from fusedit.errors import UserInputError
from fusedit.model.module_map import QKV_GROUPS, QWEN21_MLP_GROUP

if TYPE_CHECKING:  # PEFT is imported where an adapter is built or walked: detect and config validation read files
    from peft.tuners.lycoris_utils import LycorisLayer  # and shapes only, and PEFT's import takes seconds

MERGED_GROUPS = {**QKV_GROUPS, **QWEN21_MLP_GROUP}  # merged leaf -> its parts, in row order
LOKR_FACTORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
LOHA_FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
ADAPTER = "default"


def lycoris_config(adapter_type: str, rank: int, alpha: float, target_modules, exclude_modules, decompose_factor=-1):
    """PEFT's LoKrConfig / LoHaConfig for `lora.type` lokr / loha (default initialisation: the update starts at 0)."""
    from peft import LoHaConfig, LoKrConfig

    common = dict(r=int(rank), alpha=float(alpha), target_modules=target_modules, exclude_modules=exclude_modules)
    if adapter_type == "lokr":
        return LoKrConfig(**common, decompose_factor=int(decompose_factor))
    if adapter_type == "loha":
        return LoHaConfig(**common)
    raise ValueError(f"not a LyCORIS adapter type: {adapter_type!r}")


def lycoris_layers(transformer: nn.Module) -> dict[str, LycorisLayer]:
    """Module name -> PEFT LoKr / LoHa layer (empty for a LoRA/DoRA model)."""
    from peft.tuners.lycoris_utils import LycorisLayer

    return {
        name: module
        for name, module in transformer.named_modules()
        if isinstance(module, LycorisLayer) and ADAPTER in module._available_adapters
    }


def _factors(layer: LycorisLayer) -> dict[str, torch.Tensor]:
    names = LOKR_FACTORS if hasattr(layer, "lokr_w1") else LOHA_FACTORS
    return {name: getattr(layer, name)[ADAPTER].detach() for name in names if ADAPTER in getattr(layer, name)}


def _parts(name: str) -> tuple[str, ...] | None:
    return MERGED_GROUPS.get(name.rpartition(".")[2])


def _lokr_w1_rows(factors: dict[str, torch.Tensor]) -> int:
    return (factors["lokr_w1"] if "lokr_w1" in factors else factors["lokr_w1_a"]).shape[0]


def exact_factor(out_features: int, parts: int) -> int | None:
    """A `decompose_factor` that gives w1 a row count divisible by `parts` (the divisor of `out_features` nearest
    its square root that `parts` divides), or None."""
    divisors = [f for f in range(parts, out_features + 1, parts) if out_features % f == 0]
    return min(divisors, key=lambda f: abs(math.log(f / math.sqrt(out_features))), default=None)


def split_refusal(module: str, out_features: int, parts: tuple[str, ...], rows: int) -> str | None:
    """Why a LoKr on merged `module` ([out_features, ...], w1 with `rows` rows) has no exact standard-layout split
    (one line naming the `lora.decompose_factor` that gives one), or None when it has."""
    if rows % len(parts) == 0 or rows == 1:
        return None
    return (
        f"lora.type=lokr: {module} ([{out_features}, ...]) would get a Kronecker factor w1 with {rows} rows, not a "
        f"multiple of {len(parts)}, so its update does not split into {'/'.join(parts)} LoKr factors for the "
        f"standard-layout export; set lora.decompose_factor={exact_factor(out_features, len(parts))} "
        "(or model.layout=standard)"
    )


def w1_rows(out_features: int, decompose_factor: int = -1) -> int:
    """The row count PEFT's LoKr gives w1 on a Linear with `out_features` outputs (its own `factorization`)."""
    from peft.tuners.lokr.layer import factorization

    return factorization(out_features, int(decompose_factor))[0]


def check_exact_split(transformer: nn.Module) -> None:
    """UserInputError (one line) when a LoKr on a merged module cannot be exported exactly in the standard layout."""
    for name, layer in lycoris_layers(transformer).items():
        parts = _parts(name)
        factors = _factors(layer)
        if parts is None or "lokr_w1" not in factors and "lokr_w1_a" not in factors:
            continue
        refusal = split_refusal(name, layer.get_base_layer().out_features, parts, _lokr_w1_rows(factors))
        if refusal:
            raise UserInputError(refusal)


def _split_factors(factors: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    """A merged module's factors -> each part's (row blocks, in order), exactly as the module docstring says."""
    if "hada_w1_a" in factors:
        left = {key: factors[key].chunk(parts) for key in ("hada_w1_a", "hada_w2_a")}
        return [{**factors, **{key: blocks[k] for key, blocks in left.items()}} for k in range(parts)]
    rows = _lokr_w1_rows(factors)
    key = ("lokr_w1" if "lokr_w1" in factors else "lokr_w1_a") if rows % parts == 0 else None
    if key is None:  # rows == 1 (check_exact_split): the parts are row blocks of w2
        key = "lokr_w2" if "lokr_w2" in factors else "lokr_w2_a"
    return [{**factors, key: block} for block in factors[key].chunk(parts)]


def lycoris_delta(factors: dict[str, torch.Tensor], scale: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight update [out, in] (`dtype`, fp32 by default) of one module's LoKr / LoHa factors at scale `scale`
    (PEFT's formula, the same as LyCORIS' and ComfyUI's)."""
    f = {key: value.to(dtype) for key, value in factors.items()}
    if "hada_w1_a" in f:
        return (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"]) * scale
    w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
    w2 = f["lokr_w2"] if "lokr_w2" in f else f["lokr_w2_a"] @ f["lokr_w2_b"]
    return torch.kron(w1, w2) * scale


def standard_modules(transformer: nn.Module) -> dict[str, tuple[dict[str, torch.Tensor], float, int]]:
    """Module (standard layout) -> (factors, scale, rank): merged modules split into their parts (exact)."""
    check_exact_split(transformer)
    modules = {}
    for name, layer in lycoris_layers(transformer).items():
        factors, scale, rank = _factors(layer), float(layer.scaling[ADAPTER]), int(layer.r[ADAPTER])
        parts = _parts(name)
        if parts is None:
            modules[name] = (factors, scale, rank)
            continue
        prefix = name.rpartition(".")[0]
        for part, part_factors in zip(parts, _split_factors(factors, len(parts)), strict=True):
            modules[f"{prefix}.{part}"] = (part_factors, scale, rank)
    return modules


def _comfyui_tensors(module: str, factors: dict[str, torch.Tensor], scale: float, rank: int) -> dict[str, torch.Tensor]:
    # ComfyUI's scale: alpha / rank when a factor is low-rank (LoHa always; LoKr when w1_a or w2_a exists), else 1.
    low_rank = "hada_w1_a" in factors or "lokr_w1_a" in factors or "lokr_w2_a" in factors
    if not low_rank:
        factors = {**factors, "lokr_w1": factors["lokr_w1"] * scale}
    # clone: the parts of a merged module share their right factors, and a file holds each tensor once
    tensors = {f"diffusion_model.{module}.{key}": value.clone().contiguous() for key, value in factors.items()}
    if low_rank:
        tensors[f"diffusion_model.{module}.alpha"] = torch.tensor(scale * rank, dtype=torch.float32)
    return tensors


def export_lycoris(transformer: nn.Module, path: str | os.PathLike, **metadata: str) -> Path:
    """Write the LoKr / LoHa adapter to `path` (atomically) in the standard layout, with ComfyUI's keys.

    Each module's update lycoris_delta(factors, alpha / rank) equals, per standard q/k/v weight, the row block of
    the trained merged module's update (module docstring). Raises ValueError (check_exact_split) where it cannot.
    """
    from fusedit.io import save_safetensors_atomic

    modules = standard_modules(transformer)
    if not modules:
        raise ValueError("the transformer has no LoKr / LoHa adapter")
    tensors: dict[str, torch.Tensor] = {}
    for module, (factors, scale, rank) in modules.items():
        tensors.update(_comfyui_tensors(module, factors, scale, rank))
    adapter = "loha" if any(key.endswith(".hada_w1_a") for key in tensors) else "lokr"
    info = {"adapter": adapter, "layout": "standard", "format": "comfyui"}
    meta = {key: str(value) for key, value in metadata.items()}
    meta.update(format="pt", fusedit_adapter=json.dumps(info, sort_keys=True))
    save_safetensors_atomic(tensors, path, meta)
    return Path(path)


FILE_PREFIX = "diffusion_model."  # ComfyUI's module prefix, as export_lycoris writes it
# The factor sets of one Linear: LoHa, and LoKr with each of w1, w2 full or low-rank.
COMPLETE_FACTOR_SETS = [
    set(LOHA_FACTORS),
    *(
        {*w1, *w2}
        for w1 in (("lokr_w1",), ("lokr_w1_a", "lokr_w1_b"))
        for w2 in (("lokr_w2",), ("lokr_w2_a", "lokr_w2_b"))
    ),
]


def comfyui_scale(factors: dict[str, torch.Tensor], alpha: float | None) -> float:
    """The scale ComfyUI (and LyCORIS) applies to a module's LoKr / LoHa update at strength 1: alpha over the rank
    of a low-rank factor (LoHa: hada_w1_b's rows; LoKr: lokr_w2_b's rows, else lokr_w1_b's), and 1 without an
    alpha or (LoKr) without a low-rank factor. export_lycoris writes its files for this rule."""
    if "hada_w1_b" in factors:
        rank = factors["hada_w1_b"].shape[0]
    else:
        low_rank = factors.get("lokr_w2_b", factors.get("lokr_w1_b"))
        rank = None if low_rank is None else low_rank.shape[0]
    return 1.0 if alpha is None or rank is None else float(alpha) / rank


def read_lycoris(tensors: dict[str, torch.Tensor], what: str) -> dict[str, tuple[dict[str, torch.Tensor], float]]:
    """A LoKr / LoHa file's tensors (ComfyUI's / LyCORIS' keys, `[diffusion_model.]<module>.<factor>` and
    `.alpha`) -> module -> (factors, comfyui_scale). Raises UserInputError (one line, naming `what` and the module)
    for a module missing a factor or mixing LoKr and LoHa keys."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        module, _, factor = key.removeprefix(FILE_PREFIX).rpartition(".")
        grouped.setdefault(module, {})[factor] = value
    modules = {}
    for module, found in sorted(grouped.items()):
        alpha = found.pop("alpha", None)
        if set(found) not in COMPLETE_FACTOR_SETS:
            raise UserInputError(
                f"{what}: module {module} has the LoKr / LoHa factors {sorted(found)}, which are no complete LoHa "
                "(hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b) or LoKr (lokr_w1 or lokr_w1_a/_b, lokr_w2 or "
                "lokr_w2_a/_b) of a Linear"
            )
        modules[module] = (found, comfyui_scale(found, None if alpha is None else float(alpha)))
    return modules
