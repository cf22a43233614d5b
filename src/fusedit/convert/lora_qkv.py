"""Exact conversion of LoRAs between the standard and the merged-QKV layout.

merged -> standard: a `to_qkv` LoRA (A [r, in], B [3*out, r], alpha) becomes three LoRAs that share A (copied)
and take B's thirds; rank and alpha are unchanged, so each product B_i·A·alpha/r is exactly the matching slice.

standard -> merged: q/k/v LoRAs become one LoRA of rank r_q + r_k + r_v with A = [A_q; A_k; A_v] and a
block-diagonal B, so the merged product's q/k/v row blocks are exactly B_i·A_i. A projection the LoRA does not
target gets rank 0 (an all-zero block of B). One alpha must serve all three blocks: the merged scale is the most
common of the three scales (preferring one whose ratios to the others are powers of two); a block with a different
scale gets the ratio folded into its B (one rounding per element, none when the ratio is a power of two). When q/k/v share one A, rank and alpha (a LoRA that was split
from a merged one) the result is rank r with B = [B_q; B_k; B_v], the original merged LoRA bit for bit.

Every merge is recorded (`LoraWeights.qkv_split`, stored in the `fusedit_lora` metadata), so splitting it again
restores the original ranks, factors and alphas instead of three rank-3r LoRAs (bit for bit, except a block folded
by a ratio that is not a power of two: it keeps its folded B with the merged scale, the same product).

Qwen-Image-2.1's `img_mlp.gate_up_proj` (= `gate_layer` + `proj`) converts the same way with two blocks.

DoRA (a magnitude vector m per module, its weight m * (W + s B A) / ||W + s B A|| with the norm per output row):
the rows of the merged weight are the rows of q, k and v and the conversion keeps every row's s B A, so m splits
into the parts' magnitudes by rows and concatenates back, exactly. This is the one place that split happens
(training's DoRA export goes through it). Merging needs every part's magnitude: a part the DoRA LoRA does not
target would need its base weight's row norms, which a LoRA file does not hold, so that merge is refused.
"""

from __future__ import annotations

import collections

import torch

from fusedit.errors import UserInputError

from .layout import DIRECTIONS, TO_MERGED, proj_role
from .lora_formats import LoraModule, LoraWeights, is_power_of_two


def _merged_scale(scales: list[float], total_rank: int) -> float:
    """The one scale of the merged LoRA: the candidate that leaves most blocks untouched (ratio 1), then most
    blocks folded by a power of two (exact), among the blocks' own scales and 1.0; ties go to the q block."""
    best, best_score = 1.0, None
    for candidate in [*scales, 1.0]:
        if candidate <= 0 or (candidate * total_rank) / total_rank != candidate:
            continue  # not expressible as alpha / rank without rounding
        ratios = [s / candidate for s in scales]
        score = (sum(r == 1.0 for r in ratios), sum(is_power_of_two(r) for r in ratios))
        if best_score is None or score > best_score:
            best, best_score = candidate, score
    return best


def _split_module(name: str, mod: LoraModule, record: dict | None) -> dict[str, LoraModule]:
    role = proj_role(name)
    rows, count = mod.B.shape[0], len(role.parts)
    if rows % count:
        raise UserInputError(
            f"LoRA {name}: lora_B has {rows} output rows, not divisible by {count} for {', '.join(role.parts)}"
        )
    out = rows // count
    parts = [f"{role.attn_prefix}{part}" for part in role.parts]
    # DoRA: each part's magnitude is its rows of the merged one (module docstring); cloned, as B's rows are
    magnitudes = [None] * count if mod.magnitude is None else [m.clone() for m in mod.magnitude.split(out)]
    if record is not None and len(record["ranks"]) == count and sum(record["ranks"]) == mod.rank:
        offsets = [sum(record["ranks"][:i]) for i in range(count)]
        mask = torch.ones_like(mod.B, dtype=torch.bool)
        for i, r_i in enumerate(record["ranks"]):
            mask[i * out : (i + 1) * out, offsets[i] : offsets[i] + r_i] = False
        if not mod.B[mask].any():  # still block diagonal: undo the merge exactly
            result = {}
            for i, r_i in enumerate(record["ranks"]):
                if r_i == 0:
                    continue
                A_i = mod.A[offsets[i] : offsets[i] + r_i].clone()
                B_i = mod.B[i * out : (i + 1) * out, offsets[i] : offsets[i] + r_i].clone()
                factor = record["factors"][i]
                if factor == 1.0:
                    alpha = record["alphas"][i]
                elif is_power_of_two(factor):  # dividing by a power of two undoes the fold exactly
                    B_i, alpha = (B_i.float() / factor).to(B_i.dtype), record["alphas"][i]
                else:
                    alpha = mod.scale * r_i  # keep the folded B: its scale is the merged one
                result[parts[i]] = LoraModule(A_i, B_i, float(alpha), magnitudes[i])
            return result
    # clones: the parts must not share storage (safetensors refuses to save shared tensors)
    return {
        part: LoraModule(mod.A.clone(), mod.B[i * out : (i + 1) * out].clone(), mod.alpha, magnitudes[i])
        for i, part in enumerate(parts)
    }


def _merge_group(parts: dict[int, tuple[str, LoraModule]], count: int) -> tuple[LoraModule, dict | None]:
    mods = {i: mod for i, (_, mod) in parts.items()}
    described = ", ".join(
        f"{name} A{list(mod.A.shape)} {mod.A.dtype} B{list(mod.B.shape)} {mod.B.dtype}" for name, mod in parts.values()
    )
    if (
        len({m.A.shape[1] for m in mods.values()}) != 1
        or len({m.B.shape[0] for m in mods.values()}) != 1
        or len({m.A.dtype for m in mods.values()}) != 1
        or len({m.B.dtype for m in mods.values()}) != 1
    ):
        raise UserInputError(f"LoRA q/k/v modules differ in in/out features or dtype, cannot merge: {described}")
    first = next(iter(mods.values()))
    out, in_features = first.B.shape[0], first.A.shape[1]
    magnitude = None
    if any(m.magnitude is not None for m in mods.values()):
        if len(mods) != count:
            names = ", ".join(name for name, _ in parts.values())
            raise UserInputError(
                f"DoRA LoRA on {names} only: merging it into one projection needs a magnitude for every part, and "
                "an untargeted part's (its base weight's row norms) is not in a LoRA file; load it on the "
                "standard layout (model.layout=standard) or train it on all of them"
            )
        magnitude = torch.cat([mods[i].magnitude for i in range(count)])  # rows in the merged weight's order
    if (
        len(mods) == count
        and len({(m.rank, m.alpha) for m in mods.values()}) == 1
        and all(torch.equal(mods[0].A, mods[i].A) for i in range(1, count))
    ):
        B = torch.cat([mods[i].B for i in range(count)], dim=0)
        return LoraModule(mods[0].A, B, mods[0].alpha, magnitude), None

    ranks = [mods[i].rank if i in mods else 0 for i in range(count)]
    total = sum(ranks)
    scale = _merged_scale([m.scale for m in mods.values()], total)
    alpha = scale * total
    A = torch.cat([mods[i].A for i in range(count) if i in mods], dim=0)
    B = torch.zeros(count * out, total, dtype=first.B.dtype)
    factors = [1.0] * count
    offset = 0
    for i in range(count):
        if i not in mods:
            continue
        B_i = mods[i].B
        factors[i] = mods[i].scale / scale
        if factors[i] != 1.0:
            B_i = (B_i.float() * factors[i]).to(B_i.dtype)
        B[i * out : (i + 1) * out, offset : offset + ranks[i]] = B_i
        offset += ranks[i]
    assert A.shape == (total, in_features)
    record = {
        "ranks": ranks,
        "alphas": [mods[i].alpha if i in mods else None for i in range(count)],
        "factors": factors,
    }
    return LoraModule(A, B, float(alpha), magnitude), record


def convert_lora_layout(lora: LoraWeights, direction: str) -> LoraWeights:
    """Return `lora` converted to the layout `direction` names; a LoRA already there is returned unchanged."""
    if direction not in DIRECTIONS:
        raise UserInputError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    to_merged = direction == TO_MERGED
    lora.layout  # noqa: B018 -- raises on a LoRA that mixes layouts
    modules: dict[str, LoraModule] = {}
    qkv_split = dict(lora.qkv_split)
    if not to_merged:
        for name, mod in lora.modules.items():
            role = proj_role(name)
            if role is None or not role.merged:
                modules[name] = mod
                continue
            modules.update(_split_module(name, mod, qkv_split.pop(name, None)))
        return LoraWeights(modules, lora.format, dict(lora.metadata), lora.prefix, qkv_split)

    groups: dict[str, dict[int, tuple[str, LoraModule]]] = collections.defaultdict(dict)
    counts: dict[str, int] = {}
    order: list[str] = []
    for name, mod in lora.modules.items():
        role = proj_role(name)
        if role is None or role.merged:
            order.append(name)
            continue
        merged_name = f"{role.attn_prefix}{role.group}"
        if merged_name not in groups:
            order.append(merged_name)
        groups[merged_name][role.index] = (name, mod)
        counts[merged_name] = len(role.parts)
    for name in order:
        if name not in groups:
            modules[name] = lora.modules[name]
            continue
        modules[name], record = _merge_group(groups[name], counts[name])
        if record is not None:
            qkv_split[name] = record
    return LoraWeights(modules, lora.format, dict(lora.metadata), lora.prefix, qkv_split)
