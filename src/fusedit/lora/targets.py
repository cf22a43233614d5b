"""LoRA target layouts for the Qwen-Image transformer, valid in either QKV layout.

Targets are module names inside a `transformer_blocks.N` block, as PEFT matches them (by suffix). A target list
may be written for either layout: `resolve_targets` translates it to the layout of the model it is applied to
(`to_qkv` <-> `to_q,to_k,to_v`, `add_qkv_proj` <-> `add_q_proj,add_k_proj,add_v_proj`), so one config trains
the standard and the merged model alike.
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
    TIMESTEP_LINEARS,
    TOP_LEVEL_LINEARS,
)

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


def _normalise(target: str) -> str:
    # Accept the dotted forms people copy from state dicts (`attn.to_qkv`, `transformer_blocks.0.attn.to_q`).
    name = target.strip()
    if name.startswith(f"{BLOCKS}."):
        name = name.split(".", 2)[2] if name.count(".") >= 2 else name
    return name.removeprefix(f"{ATTENTION}.")


def resolve_targets(targets: str | Iterable[str], layout: str) -> list[str]:
    """The PEFT target module names for `targets` on a model in `layout`.

    `targets` is a named layout (`attn`, `attn_mlp`, `full`), a Linear name in either QKV layout, or a list (or
    comma-separated string) of those. Unknown names raise a ValueError listing the valid ones.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"model layout must be one of {LAYOUTS}, got {layout!r}")
    if isinstance(targets, str):
        targets = targets.split(",")
    # Named layouts may appear inside a list too: ["attn_mlp", "proj_out"].
    expanded = [name for target in targets for name in NAMED_TARGETS.get(target.strip(), (target,))]
    names = [_normalise(target) for target in expanded if target.strip()]
    if not names:
        raise ValueError(f"lora.targets is empty; use one of {sorted(NAMED_TARGETS)} or a list of {VALID_TARGETS}")
    unknown = [name for name in names if name not in VALID_TARGETS]
    if unknown:
        raise ValueError(
            f"unknown LoRA target(s) {unknown}. Valid: a named layout {sorted(NAMED_TARGETS)} or Linear names "
            f"{list(VALID_TARGETS)} (standard and merged QKV names are translated automatically)"
        )
    resolved: list[str] = []
    for name in names:
        if layout == "merged_qkv":
            translated = [_STANDARD_TO_MERGED.get(name, name)]
        else:
            translated = list(QKV_GROUPS.get(name, (name,)))
        resolved.extend(translated)
    return list(dict.fromkeys(resolved))
