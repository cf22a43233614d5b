"""Key layouts of Qwen-Image transformer checkpoints and the model-weight conversion plan.

Two layouts exist. "standard" is diffusers' `QwenImageTransformer2DModel`: every block's attention has
`to_q/to_k/to_v` and `add_q_proj/add_k_proj/add_v_proj`. "merged_qkv" replaces each triple by one projection,
`to_qkv` / `add_qkv_proj`, whose weight (and bias) is `cat([q, k, v], dim=0)`. Nothing else differs.
For Qwen-Image-2.1 (`QwenImage21Transformer2DModel`) "merged_qkv" also merges the SwiGLU's `img_mlp.gate_layer`
and `img_mlp.proj` into `img_mlp.gate_up_proj` (`cat([gate, up], dim=0)`): a merge group has two or three parts.

The conversion is planned from names, shapes and dtypes only, so the same plan drives the in-memory
`convert_state_dict` and the streaming file converter that never holds a whole checkpoint.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fusedit.errors import UserInputError, examples
from fusedit.model.module_map import ATTENTION, QKV_GROUPS, QWEN21_ATTENTION_GROUP, QWEN21_MLP, QWEN21_MLP_GROUP

from .single_file import INPUT_SCALE, WEIGHT_SCALE

if TYPE_CHECKING:  # layouts are found from names and shapes alone (`fusedit detect`); only `build` touches tensors
    import torch

STANDARD = "standard"
MERGED = "merged_qkv"
TO_MERGED = "to_merged"
TO_STANDARD = "to_standard"
DIRECTIONS = (TO_MERGED, TO_STANDARD)
LAYOUTS = (STANDARD, MERGED)
TARGET_LAYOUT = {TO_MERGED: MERGED, TO_STANDARD: STANDARD}
DIRECTION_TO = {layout: direction for direction, layout in TARGET_LAYOUT.items()}

# The attention q/k/v parts only (what a target name like `to_q` means in either family).
PART_TO_MERGED: dict[str, tuple[str, int]] = {
    part: (merged, index) for merged, parts in QKV_GROUPS.items() for index, part in enumerate(parts)
}

# Every merge group, by the block child that holds it: merged name -> parts in concatenation order. The leaf
# `proj` is a 2.1 SwiGLU part only under `img_mlp` (the MMDiT's `img_mlp.net.0.proj` is not matched).
MERGE_GROUPS: dict[str, dict[str, tuple[str, ...]]] = {
    ATTENTION: {**QKV_GROUPS, **QWEN21_ATTENTION_GROUP},
    QWEN21_MLP: dict(QWEN21_MLP_GROUP),
}
_PART_INDEX = {
    (parent, part): (merged, index)
    for parent, groups in MERGE_GROUPS.items()
    for merged, parts in groups.items()
    for index, part in enumerate(parts)
}


def _names_re(parent: str) -> str:
    names = [*MERGE_GROUPS[parent], *(part for (p, part) in _PART_INDEX if p == parent)]
    return "|".join(sorted(names, key=len, reverse=True))


# A module path ending in one of the projections; the prefix up to the parent (checkpoint prefix included) is kept
# verbatim.
_PROJ_MODULE_RE = re.compile(
    "|".join(rf"^(?P<{parent}>(?:.*\.)?{parent}\.)(?P<{parent}_proj>{_names_re(parent)})$" for parent in MERGE_GROUPS)
)


@dataclass(frozen=True)
class ProjRole:
    attn_prefix: str  # the parent's path: "model.diffusion_model.transformer_blocks.3.attn." (or "...img_mlp.")
    proj: str  # e.g. "to_k", "to_qkv", "gate_layer"
    parent: str = ATTENTION  # the block child holding it: "attn", or "img_mlp" (Qwen-Image-2.1's SwiGLU)

    @property
    def merged(self) -> bool:
        return self.proj in MERGE_GROUPS[self.parent]

    @property
    def group(self) -> str:
        """Name of the merged projection this belongs to."""
        return self.proj if self.merged else _PART_INDEX[(self.parent, self.proj)][0]

    @property
    def index(self) -> int:
        return _PART_INDEX[(self.parent, self.proj)][1]

    @property
    def parts(self) -> tuple[str, ...]:
        """The group's parts, in concatenation order (two or three)."""
        return MERGE_GROUPS[self.parent][self.group]


def proj_role(module: str) -> ProjRole | None:
    """Which q/k/v, 2.1 gate/up (or merged) projection a module path names, or None for any other module."""
    match = _PROJ_MODULE_RE.match(module)
    if match is None:
        return None
    parent = next(parent for parent in MERGE_GROUPS if match[parent] is not None)
    return ProjRole(match[parent], match[f"{parent}_proj"], parent)


def layout_of_modules(names: Iterable[str], what: str = "state dict", module_of=lambda name: name) -> str | None:
    """The layout: "standard", "merged_qkv", or None when no q/k/v projection appears. Both at once is an error
    naming the keys (`names` are module paths, or keys mapped to their module by `module_of`)."""
    standard, merged = [], []
    for name in names:
        role = proj_role(module_of(name))
        if role is not None:
            (merged if role.merged else standard).append(name)
    if standard and merged:
        raise UserInputError(
            f"{what} mixes layouts: separate q/k/v projections ({examples(standard)}) and merged ones "
            f"({examples(merged)}); a checkpoint must use one layout"
        )
    if merged:
        return MERGED
    if standard:
        return STANDARD
    return None


def split_param_key(key: str) -> tuple[str, str]:
    module, _, param = key.rpartition(".")
    return module, param


def model_layout(keys: Iterable[str], what: str = "state dict") -> str | None:
    return layout_of_modules(keys, what, lambda key: split_param_key(key)[0])


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: copied from one source, concatenated from several, or one part of a merged source."""

    name: str
    dtype: Any  # whatever the caller's dtype objects are (torch dtypes or safetensors dtype strings)
    shape: tuple[int, ...]
    sources: tuple[str, ...]
    part: int | None = None  # which part of sources[0] (split only)
    split_into: int = 3  # how many parts sources[0] holds (split only; 2 for 2.1's gate_up_proj)
    # Merging fp8 scales (convert.single_file): each source's weight row count; a per-tensor scale is repeated
    # once per row of its weight, so the merged weight gets an exact per-row scale.
    rows: tuple[int, ...] | None = None
    equal: bool = False  # merging a scale that must be the same in q, k and v (an activation scale): keep one

    def build(self, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
        import torch

        if self.equal:
            first, *others = (get(name) for name in self.sources)
            if any(not torch.equal(first, other) for other in others):
                raise ValueError(f"cannot merge {', '.join(self.sources)}: the three scales differ")
            return first
        if self.rows is not None:
            parts = [get(name).reshape(-1) for name in self.sources]
            return torch.cat([p.expand(r) if p.numel() == 1 else p for p, r in zip(parts, self.rows, strict=True)])
        if len(self.sources) > 1:
            return torch.cat([get(name) for name in self.sources], dim=0)
        tensor = get(self.sources[0])
        if self.part is not None:
            rows = tensor.shape[0] // self.split_into
            # clone: a view would keep the whole merged tensor alive and safetensors refuses shared storage
            return tensor[self.part * rows : (self.part + 1) * rows].clone()
        return tensor


def _plan_scale(plan: list, tensors: Mapping, key: str, role: ProjRole, param: str, direction: str) -> list[str]:
    """Plan an "fp8 scaled" file's scale under a q/k/v projection (convert.single_file); returns problems.

    Split: a per-tensor scale is copied to q, k and v (each third of the weight had that scale), a per-row scale
    is split like the weight. Merge: weight scales become one per-row scale (exact); an input (activation) scale
    is one number for the shared input and must be equal in q, k and v (checked when the tensors are read).
    """
    dtype, shape = tensors[key]
    numel = 1
    for size in shape:
        numel *= size
    if direction == TO_STANDARD:
        weight_rows = tensors.get(f"{role.attn_prefix}{role.proj}.weight", (None, (0,)))[1][0]
        count = len(role.parts)
        for index, part in enumerate(role.parts):
            name = f"{role.attn_prefix}{part}.{param}"
            if numel == 1:
                plan.append(TensorPlan(name, dtype, tuple(shape), (key,)))
            elif numel == weight_rows and shape[0] % count == 0:
                plan.append(TensorPlan(name, dtype, (shape[0] // count, *shape[1:]), (key,), index, count))
            else:
                return [f"{key}: scale of shape {list(shape)} fits neither the tensor nor its rows"]
        return []
    if role.index != 0:
        return []
    names = tuple(f"{role.attn_prefix}{part}.{param}" for part in role.parts)
    missing = [name for name in names if name not in tensors]
    if missing:
        return [f"{key}: missing q/k/v sibling(s) {', '.join(missing)}"]
    merged = f"{role.attn_prefix}{role.group}.{param}"
    if param == INPUT_SCALE:
        plan.append(TensorPlan(merged, dtype, tuple(shape), names, equal=True))
        return []
    rows = tuple(tensors.get(f"{role.attn_prefix}{part}.weight", (None, (0,)))[1][0] for part in role.parts)
    plan.append(TensorPlan(merged, dtype, (sum(rows),), names, rows=rows))
    return []


def plan_model_conversion(
    tensors: Mapping[str, tuple[Any, tuple[int, ...]]], direction: str, what: str = "state dict"
) -> list[TensorPlan]:
    """Plan converting model weights given as {key: (dtype, shape)}; output order follows the input order.

    A merged tensor takes the position of its q part; split parts take the position of the merged tensor.
    Raises ValueError naming the keys for a missing sibling, a shape or dtype mismatch, or a tensor under a q/k/v
    projection that is not a weight or bias.
    """
    if direction not in DIRECTIONS:
        raise UserInputError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    plan: list[TensorPlan] = []
    problems: list[str] = []
    for key, (dtype, shape) in tensors.items():
        module, param = split_param_key(key)
        role = proj_role(module)
        if role is None or (direction == TO_MERGED) == role.merged:
            plan.append(TensorPlan(key, dtype, tuple(shape), (key,)))
            continue
        if param in (WEIGHT_SCALE, INPUT_SCALE):
            problems += _plan_scale(plan, tensors, key, role, param, direction)
            continue
        if param not in ("weight", "bias"):
            problems.append(f"{key}: only weight and bias can be converted under a q/k/v projection")
            continue
        count = len(role.parts)
        if direction == TO_STANDARD:
            if not shape or shape[0] % count:
                problems.append(f"{key}: shape {list(shape)} has a first dimension not divisible by {count}")
                continue
            for index, part in enumerate(role.parts):
                name = f"{role.attn_prefix}{part}.{param}"
                plan.append(TensorPlan(name, dtype, (shape[0] // count, *shape[1:]), (key,), index, count))
            continue
        if role.index != 0:
            continue  # emitted together with its first sibling
        names = tuple(f"{role.attn_prefix}{part}.{param}" for part in role.parts)
        missing = [name for name in names if name not in tensors]
        if missing:
            problems.append(f"{key}: missing q/k/v sibling(s) {', '.join(missing)}")
            continue
        specs = [tensors[name] for name in names]
        if len({tuple(s) for _, s in specs}) != 1 or len({d for d, _ in specs}) != 1:
            found = ", ".join(f"{name} {d} {list(s)}" for name, (d, s) in zip(names, specs, strict=True))
            problems.append(f"q/k/v tensors differ in shape or dtype, cannot merge losslessly: {found}")
            continue
        merged_rows = sum(s[0] for _, s in specs)
        plan.append(TensorPlan(f"{role.attn_prefix}{role.group}.{param}", dtype, (merged_rows, *shape[1:]), names))
    # k/v whose q is absent are caught above through the q; catch orphans whose q is missing entirely
    if direction == TO_MERGED:
        for key in tensors:
            module, param = split_param_key(key)
            role = proj_role(module)
            if role is not None and not role.merged and role.index != 0:
                q_key = f"{role.attn_prefix}{role.parts[0]}.{param}"
                if q_key not in tensors:
                    problems.append(f"{key}: missing q/k/v sibling {q_key}")
    if problems:
        raise UserInputError(f"cannot convert {what} {direction}:\n  " + "\n  ".join(problems))
    return plan
