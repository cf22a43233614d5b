"""LoRA target layouts for the Qwen-Image transformer, valid in either QKV layout.

Targets are module names inside a `transformer_blocks.N` block, as PEFT matches them (by suffix). A target list
may be written for either layout: `resolve_targets` translates it to the layout of the model it is applied to
(`to_qkv` <-> `to_q,to_k,to_v`, `add_qkv_proj` <-> `add_q_proj,add_k_proj,add_v_proj`), so one config trains
the standard and the merged model alike.

Qwen-Image-2.1 (`family="qwen-image-2.1"`) has its own Linears and named layouts (`QWEN21_NAMED_TARGETS`): its
single-stream blocks have no text-stream projections and no per-block modulation; `img_mlp.gate_layer` +
`img_mlp.proj` <-> `img_mlp.gate_up_proj` translate like q/k/v.
"""

from __future__ import annotations

from collections.abc import Iterable

# Config validation resolves targets before anything heavy is loaded: both imports below are pure data.
from fusedit.convert.layout import LAYOUTS
from fusedit.model.module_map import (
    ATTENTION,
    BLOCK_LINEARS,
    BLOCKS,
    QKV_GROUPS,
    QWEN21_ATTENTION_GROUP,
    QWEN21_BLOCK_LINEARS,
    QWEN21_MLP,
    QWEN21_MLP_GROUP,
    QWEN21_TOP_LEVEL_LINEARS,
    TIMESTEP_LINEARS,
    TOP_LEVEL_LINEARS,
)

QWEN21_FAMILY = "qwen-image-2.1"  # fusedit.families.QWEN_IMAGE_21 (not imported: keep this module pure data)

# Named layouts, written in the merged naming (translated on use).
ATTN = ("to_qkv", "add_qkv_proj")
ATTN_MLP = (
    *ATTN,
    "to_out.0",
    "to_add_out",
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
)
FULL = (*ATTN_MLP, "img_mod.1", "txt_mod.1")

# Every Linear inside a block, both layouts, as PEFT suffixes (`attn.` dropped: the leaf names are unique).
BLOCK_TARGETS = tuple(name.removeprefix(f"{ATTENTION}.") for name in BLOCK_LINEARS)

# Linears outside the blocks, for targets lists that want them (no named layout uses them). The timestep MLP is
# not offered: its `linear_1` / `linear_2` suffixes are not names a user would recognise as Qwen-Image modules.
TOP_LEVEL_TARGETS = tuple(name for name in TOP_LEVEL_LINEARS if name not in TIMESTEP_LINEARS)
VALID_TARGETS = (*BLOCK_TARGETS, *TOP_LEVEL_TARGETS)

NAMED_TARGETS = {"attn": ATTN, "attn_mlp": ATTN_MLP, "full": FULL}

_STANDARD_TO_MERGED = {name: merged for merged, names in QKV_GROUPS.items() for name in names}

# Qwen-Image-2.1: the SwiGLU names keep their `img_mlp.` (PEFT suffixes; `proj` / `out` alone would be ambiguous).
_QWEN21_GROUPS = {
    **QWEN21_ATTENTION_GROUP,
    **{
        f"{QWEN21_MLP}.{merged}": tuple(f"{QWEN21_MLP}.{part}" for part in parts)
        for merged, parts in QWEN21_MLP_GROUP.items()
    },
}
QWEN21_ATTN = ("to_qkv",)
QWEN21_ATTN_MLP = (*QWEN21_ATTN, "to_out.0", "img_mlp.gate_up_proj", "img_mlp.out")
# No per-block modulation in 2.1 (one shared `modulation` Linear outside the blocks): "full" is attn_mlp.
QWEN21_NAMED_TARGETS = {"attn": QWEN21_ATTN, "attn_mlp": QWEN21_ATTN_MLP, "full": QWEN21_ATTN_MLP}
QWEN21_BLOCK_TARGETS = tuple(name.removeprefix(f"{ATTENTION}.") for name in QWEN21_BLOCK_LINEARS)
QWEN21_TOP_LEVEL_TARGETS = tuple(name for name in QWEN21_TOP_LEVEL_LINEARS if name not in TIMESTEP_LINEARS)
QWEN21_VALID_TARGETS = (*QWEN21_BLOCK_TARGETS, *QWEN21_TOP_LEVEL_TARGETS)
_QWEN21_STANDARD_TO_MERGED = {name: merged for merged, names in _QWEN21_GROUPS.items() for name in names}


def _normalise(target: str) -> str:
    # Accept the dotted forms people copy from state dicts (`attn.to_qkv`, `transformer_blocks.0.attn.to_q`).
    name = target.strip()
    if name.startswith(f"{BLOCKS}."):
        name = name.split(".", 2)[2] if name.count(".") >= 2 else name
    return name.removeprefix(f"{ATTENTION}.")


def resolve_targets(targets: str | Iterable[str], layout: str, family: str | None = None) -> list[str]:
    """The PEFT target module names for `targets` on a model in `layout`.

    `targets` is a named layout (`attn`, `attn_mlp`, `full`), a Linear name in either layout, or a list (or
    comma-separated string) of those. `family` "qwen-image-2.1" selects Qwen-Image-2.1's Linears; any other value
    (None included) the Qwen-Image MMDiT's. Unknown names raise a ValueError listing the valid ones.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"model layout must be one of {LAYOUTS}, got {layout!r}")
    qwen21 = family == QWEN21_FAMILY
    named = QWEN21_NAMED_TARGETS if qwen21 else NAMED_TARGETS
    valid = QWEN21_VALID_TARGETS if qwen21 else VALID_TARGETS
    groups = _QWEN21_GROUPS if qwen21 else QKV_GROUPS
    to_merged = _QWEN21_STANDARD_TO_MERGED if qwen21 else _STANDARD_TO_MERGED
    if isinstance(targets, str):
        targets = targets.split(",")
    # Named layouts may appear inside a list too: ["attn_mlp", "proj_out"].
    expanded = [name for target in targets for name in named.get(target.strip(), (target,))]
    names = [_normalise(target) for target in expanded if target.strip()]
    if not names:
        raise ValueError(f"lora.targets is empty; use one of {sorted(named)} or a list of {valid}")
    unknown = [name for name in names if name not in valid]
    if unknown:
        model = "Qwen-Image-2.1" if qwen21 else "Qwen-Image"
        raise ValueError(
            f"unknown LoRA target(s) {unknown} for {model}. Valid: a named layout {sorted(named)} or Linear names "
            f"{list(valid)} (standard and merged names are translated automatically)"
        )
    resolved: list[str] = []
    for name in names:
        resolved.extend([to_merged.get(name, name)] if layout == "merged_qkv" else groups.get(name, (name,)))
    return list(dict.fromkeys(resolved))
