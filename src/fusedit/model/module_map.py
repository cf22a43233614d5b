"""The Qwen-Image transformer's module facts, in one place (as diffusers keeps `_no_split_modules` / `_tp_plan`
beside a model): which Linears exist, how q/k/v merge, where the blocks are, what is entry/exit, what never trains.

Names are diffusers' `QwenImageTransformer2DModel` module paths; "merged_qkv" adds `attn.to_qkv` and
`attn.add_qkv_proj` in place of their q/k/v triples (fusedit.model.merged_qkv). Qwen-Image-2.1's
`QwenImage21Transformer2DModel` has its own section (`QWEN21_*`) at the end. Pure data: importing this module
loads neither torch nor diffusers, so config validation, `fusedit detect` and the key converters can use it.
"""

from __future__ import annotations

import re

# The blocks: `transformer_blocks.N.<leaf>`; every block has the same leaves.
BLOCKS = "transformer_blocks"
# A module path inside a block, anchored: group 1 the block index, group 2 the leaf path.
BLOCK_MODULE_RE = re.compile(rf"^{BLOCKS}\.(\d+)\.(.+)$")
# A block index anywhere in a key (checkpoint prefixes such as `model.diffusion_model.` allowed).
BLOCK_INDEX_RE = re.compile(rf"(?:^|\.){BLOCKS}\.(\d+)\.")

# merged projection -> its q, k, v parts, in concatenation order (the merged weight is cat([q, k, v], dim=0)).
QKV_GROUPS: dict[str, tuple[str, str, str]] = {
    "to_qkv": ("to_q", "to_k", "to_v"),
    "add_qkv_proj": ("add_q_proj", "add_k_proj", "add_v_proj"),
}
STANDARD_QKV = tuple(part for parts in QKV_GROUPS.values() for part in parts)
# Attention lives under this child of each block; q/k/v names above are relative to it.
ATTENTION = "attn"

# Every Linear inside a block, both layouts, as paths relative to the block.
ATTENTION_LINEARS = (
    *(f"{ATTENTION}.{name}" for name in (*STANDARD_QKV, *QKV_GROUPS)),
    "attn.to_out.0",
    "attn.to_add_out",
)
MODULATION_LINEARS = ("img_mod.1", "txt_mod.1")
MLP_LINEARS = ("img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")
BLOCK_LINEARS = (*ATTENTION_LINEARS, *MODULATION_LINEARS, *MLP_LINEARS)

# Top-level modules before and after the blocks (prefixes of module paths), and the Linears among them.
ENTRY_LAYERS = ("img_in", "txt_in", "time_text_embed")
EXIT_LAYERS = ("norm_out", "proj_out")
ENTRY_EXIT_LAYERS = (*ENTRY_LAYERS, *EXIT_LAYERS)
TIMESTEP_LINEARS = ("time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2")
TOP_LEVEL_LINEARS = ("img_in", "txt_in", "proj_out", "norm_out.linear", *TIMESTEP_LINEARS)

# The model returns only the image stream, so in the last block nothing after the text-stream attention output
# reaches the output: these leaves of the last block never get a gradient (LoRA there is left out, and DDP would
# need find_unused_parameters).
LAST_BLOCK_UNUSED = ("attn.to_add_out", "txt_mlp.net.0.proj", "txt_mlp.net.2")


def block_module(index: int, leaf: str) -> str:
    """`block_module(3, "attn.to_q")` -> `transformer_blocks.3.attn.to_q`."""
    return f"{BLOCKS}.{index}.{leaf}"


def block_index(key: str) -> int | None:
    """The block number in a module path or tensor key (any prefix), or None outside the blocks."""
    match = BLOCK_INDEX_RE.search(key)
    return int(match[1]) if match else None


# ------------------------------------------------------------------------------------------------ Qwen-Image-2.1
# diffusers' `QwenImage21Transformer2DModel`: one stream (text, reference-image and target tokens in one sequence),
# no per-block modulation (one shared `modulation` Linear feeds every block), a SwiGLU MLP. "merged_qkv" there
# also merges the SwiGLU's gate and up projections (fusedit.model.merged_qwen21). Same `transformer_blocks.N`
# naming, so BLOCKS / BLOCK_MODULE_RE / block_index above serve it too.
QWEN21_TRANSFORMER_CLASS = "QwenImage21Transformer2DModel"
QWEN21_MLP = "img_mlp"
# merged projection -> its parts in concatenation order, relative to the block's `attn` / `img_mlp`.
QWEN21_ATTENTION_GROUP: dict[str, tuple[str, ...]] = {"to_qkv": ("to_q", "to_k", "to_v")}
QWEN21_MLP_GROUP: dict[str, tuple[str, ...]] = {"gate_up_proj": ("gate_layer", "proj")}
QWEN21_ATTENTION_LINEARS = tuple(
    f"{ATTENTION}.{name}" for name in (*QWEN21_ATTENTION_GROUP["to_qkv"], "to_qkv", "to_out.0")
)
QWEN21_MLP_LINEARS = tuple(f"{QWEN21_MLP}.{name}" for name in ("gate_layer", "proj", "gate_up_proj", "out"))
# Every Linear inside a 2.1 block, both layouts. The model returns every token of the joint sequence, so unlike
# the MMDiT's last block nothing here goes without a gradient.
QWEN21_BLOCK_LINEARS = (*QWEN21_ATTENTION_LINEARS, *QWEN21_MLP_LINEARS)
QWEN21_ENTRY_LAYERS = ("img_in", "txt_in", "time_text_embed", "modulation")
QWEN21_EXIT_LAYERS = EXIT_LAYERS
QWEN21_ENTRY_EXIT_LAYERS = (*QWEN21_ENTRY_LAYERS, *QWEN21_EXIT_LAYERS)
QWEN21_TOP_LEVEL_LINEARS = (
    "img_in",
    "txt_in.in_layer",
    "txt_in.out_layer",
    "modulation.1",
    "proj_out",
    "norm_out.linear",
    *TIMESTEP_LINEARS,
)

# Both families' facts for code that reads keys of either (LoRA parsing, layout detection).
ALL_BLOCK_LINEARS = tuple(dict.fromkeys((*BLOCK_LINEARS, *QWEN21_BLOCK_LINEARS)))
ALL_TOP_LEVEL_LINEARS = tuple(dict.fromkeys((*TOP_LEVEL_LINEARS, *QWEN21_TOP_LEVEL_LINEARS)))
