"""Merged projections for Qwen-Image-2.1: diffusers' `QwenImage21Transformer2DModel` with two GEMMs where it has five.

A 2.1 block (single stream) projects the same normed input three times for attention (`attn.to_q/to_k/to_v`) and
the same modulated input twice for its SwiGLU (`img_mlp.gate_layer`, `img_mlp.proj`). `fuse_projections` rewrites
every block in place:

- `attn.to_q/to_k/to_v` -> one `attn.to_qkv` (weight `cat([Wq; Wk; Wv])`), read by `MergedQwenImage21AttnProcessor`
  / `MergedQwenImage21FlexAttnProcessor`, which split q, k, v as views of the one GEMM's output;
- `img_mlp.gate_layer` + `img_mlp.proj` -> one `img_mlp.gate_up_proj` (weight `cat([W_gate; W_up])`, the order
  vLLM / transformers use for a fused SwiGLU), in `MergedSwiGLUFeedForward`, which keeps diffusers' `img_mlp.out`
  Linear and its activation.

`unfuse_projections` slices the merged weights back into diffusers' Linears, bit for bit. While merged, the
model's diffusers and PEFT entry points answer for the standard names (fusedit.model.diffusers_api, the same code
as for the MMDiT): `save_pretrained` writes diffusers' standard layout (split exactly), so stock
`QwenImage21Transformer2DModel.from_pretrained` and `QwenImage21Pipeline` read what it saves; `add_adapter`
translates whole groups of standard target names (`to_q`, `to_k`, `to_v` -> `to_qkv`; `gate_layer`, `proj` ->
`img_mlp.gate_up_proj`) and refuses partial ones; `load_lora_adapter` (what `pipe.load_lora_weights` calls)
converts a standard-layout LoRA exactly to the merged layout first, every module's strength kept; PEFT's own
`inject_adapter_in_model` / `get_peft_model` given a standard name meet a parameterless `MergedPart` there and
raise, naming the merged module. Each attention module's `set_processor` (what `set_attn_processor` calls) takes
diffusers' 2.1 processors and installs their merged counterparts (`set_attn_processor(QwenImage21FlexAttnProcessor())`
as diffusers' docs show for a compiled model); other processors are refused. Not installed for 2.1: a
tensor-parallel plan for the merged projections.

No fork: the merged processors subclass diffusers' two 2.1 processors (the exact per-segment SDPA prefill and the
flex block-causal one) and call diffusers' own `__call__`, handing it an attention view whose `to_q/to_k/to_v`
return the slices of the merged GEMM. Norms, RoPE, the KV cache, the block-causal mask, attention dispatch, the
output projection, the modulation and the model's forward are diffusers' code. The model's forward picks the mask
form from `isinstance(processor, QwenImage21FlexAttnProcessor)`, which the subclasses keep true or false as their
parents do.
"""

from __future__ import annotations

import functools

import torch
from diffusers.models.transformers.transformer_qwenimage21 import (
    QwenImage21AttnProcessor,
    QwenImage21FlexAttnProcessor,
    QwenImage21SwiGLUFeedForward,
)
from torch import nn

from fusedit.model.diffusers_api import add_merged_parts, install_model_api, remove_merged_parts, uninstall_model_api
from fusedit.model.linear_merge import (
    carry_casting_hook,
    checked_casting_hook,
    invalidate_hook_caches,
    merge_linears,
    split_linear,
)
from fusedit.model.module_map import QWEN21_ATTENTION_GROUP, QWEN21_MLP, QWEN21_MLP_GROUP, QWEN21_TRANSFORMER_CLASS

ATTN_MERGED, ATTN_PARTS = next(iter(QWEN21_ATTENTION_GROUP.items()))  # to_qkv <- to_q, to_k, to_v
MLP_MERGED, MLP_PARTS = next(iter(QWEN21_MLP_GROUP.items()))  # gate_up_proj <- gate_layer, proj


class _SplitProjections:
    """The attention module as diffusers' 2.1 processors see it, with q, k, v already computed by one GEMM.

    Diffusers' `_qwenimage21_prepare_qkv` calls `attn.to_q(hidden_states)` etc.; here those return the column
    blocks of `attn.to_qkv(hidden_states)` (views, no copy). Every other attribute (heads, inner_dim, norm_q,
    norm_k, to_out) is the real module's.
    """

    def __init__(self, attn: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        self._attn = attn
        self.to_q = lambda _hidden_states: query
        self.to_k = lambda _hidden_states: key
        self.to_v = lambda _hidden_states: value

    def __getattr__(self, name: str):
        return getattr(self._attn, name)


def _split_qkv(attn: nn.Module, hidden_states: torch.Tensor) -> _SplitProjections:
    query, key, value = attn.to_qkv(hidden_states).chunk(len(ATTN_PARTS), dim=-1)
    return _SplitProjections(attn, query, key, value)


class MergedQwenImage21AttnProcessor(QwenImage21AttnProcessor):
    """diffusers' exact SDPA 2.1 processor (per-segment block-causal prefill, KV-cache decode) over `attn.to_qkv`.

    Same arguments and output as `QwenImage21AttnProcessor.__call__`: `hidden_states` (batch, seq, dim) in, the
    attention output (batch, seq, dim) after `to_out` back.
    """

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        return super().__call__(_split_qkv(attn, hidden_states), hidden_states, **kwargs)


class MergedQwenImage21FlexAttnProcessor(QwenImage21FlexAttnProcessor):
    """diffusers' flex block-causal 2.1 processor (one `flex_attention` call per prefill) over `attn.to_qkv`.

    Needs torch's flex_attention (ImportError otherwise, as its parent). On CPU flex_attention has no backward.
    """

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        return super().__call__(_split_qkv(attn, hidden_states), hidden_states, **kwargs)


class MergedSwiGLUFeedForward(nn.Module):
    """The 2.1 SwiGLU with gate and up in one GEMM: `out(silu(x W_gate^T) * (x W_up^T))`, as diffusers'
    `QwenImage21SwiGLUFeedForward`, where `gate_up_proj.weight = cat([gate_layer.weight, proj.weight])`.

    Input and output (batch, seq, dim); the hidden activation (batch, seq, 2 * mlp_hidden) is split as two views.
    `out` and `activation_fn` are the very modules of the diffusers block it replaces.
    """

    def __init__(self, gate_up_proj: nn.Linear, out: nn.Linear, activation_fn: nn.Module):
        super().__init__()
        setattr(self, MLP_MERGED, gate_up_proj)
        self.out = out
        self.activation_fn = activation_fn

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gate, up = getattr(self, MLP_MERGED)(hidden_states).chunk(len(MLP_PARTS), dim=-1)
        return self.out(self.activation_fn(gate) * up)


_MERGED_PROCESSOR = {
    QwenImage21AttnProcessor: MergedQwenImage21AttnProcessor,
    QwenImage21FlexAttnProcessor: MergedQwenImage21FlexAttnProcessor,
}
_STANDARD_PROCESSOR = {merged: standard for standard, merged in _MERGED_PROCESSOR.items()}


def is_qwen21(transformer: nn.Module) -> bool:
    """Whether `transformer` is diffusers' Qwen-Image-2.1 transformer (by class name; no import needed)."""
    return any(cls.__name__ == QWEN21_TRANSFORMER_CLASS for cls in type(transformer).__mro__)


def _blocks(transformer: nn.Module) -> list[nn.Module]:
    if not is_qwen21(transformer):
        raise TypeError(f"{type(transformer).__name__} is not a {QWEN21_TRANSFORMER_CLASS}")
    return list(transformer.transformer_blocks)


def is_merged(transformer: nn.Module) -> bool:
    """True when every block of the 2.1 `transformer` carries the merged projections."""
    return all(hasattr(block.attn, ATTN_MERGED) for block in _blocks(transformer))


def _swapped_processor(processor, table: dict, block: int):
    # A processor of a class we do not know (a user's own) cannot be translated: refuse rather than drop it.
    cls = type(processor)
    if cls in table.values():
        return processor
    if cls not in table:
        raise TypeError(
            f"transformer_blocks.{block}.attn has processor {cls.__name__}; fusedit merges the projections for "
            f"diffusers' {', '.join(c.__name__ for c in table)} only"
        )
    swapped = table[cls]()
    # set_attention_backend() state (decode steps) carries over.
    swapped._attention_backend = processor._attention_backend
    swapped._parallel_config = processor._parallel_config
    return swapped


def _set_merged_processor(attn: nn.Module, block: int, processor) -> None:
    type(attn).set_processor(attn, _swapped_processor(processor, _MERGED_PROCESSOR, block))


def fuse_projections(transformer: nn.Module) -> nn.Module:
    """Merge q/k/v and the SwiGLU's gate/up of every 2.1 block in place (a no-op on merged blocks). Returns it.

    Any storage dtype works (float8 included; `torch.cat` is exact) and diffusers' layerwise casting is carried to
    the merged Linears. Every block is checked before any changes: TypeError for a layer that is not a plain
    `nn.Linear` (a LoRA wrapper: translate target names with `fusedit.lora.targets` instead) or an unknown
    processor, RuntimeError for hooks other than layerwise casting; the model is then left as it was.
    """
    todo = []
    for index, block in enumerate(_blocks(transformer)):
        if hasattr(block.attn, ATTN_MERGED):
            continue
        if type(block.img_mlp) is not QwenImage21SwiGLUFeedForward:
            raise TypeError(f"transformer_blocks.{index}.img_mlp is a {type(block.img_mlp).__name__}, not diffusers'")
        attn_hook = checked_casting_hook(block.attn, index, ATTN_PARTS)
        mlp_hook = checked_casting_hook(block.img_mlp, index, MLP_PARTS, child=QWEN21_MLP)
        processor = _swapped_processor(block.attn.processor, _MERGED_PROCESSOR, index)
        todo.append((index, block, attn_hook, mlp_hook, processor))
    for index, block, attn_hook, mlp_hook, processor in todo:
        attn, mlp = block.attn, block.img_mlp
        merged = merge_linears([getattr(attn, name) for name in ATTN_PARTS])
        for name in ATTN_PARTS:
            delattr(attn, name)  # frees the parts right away
        setattr(attn, ATTN_MERGED, carry_casting_hook(attn_hook, merged))
        attn.set_processor(processor)
        attn.set_processor = functools.partial(_set_merged_processor, attn, index)
        gate_up = carry_casting_hook(mlp_hook, merge_linears([getattr(mlp, name) for name in MLP_PARTS]))
        block.img_mlp = MergedSwiGLUFeedForward(gate_up, mlp.out, mlp.activation_fn)
        add_merged_parts(attn, QWEN21_ATTENTION_GROUP)
        add_merged_parts(block.img_mlp, QWEN21_MLP_GROUP)
    invalidate_hook_caches(transformer)
    install_model_api(transformer)
    return transformer


def unfuse_projections(transformer: nn.Module) -> nn.Module:
    """Split every merged 2.1 block back into diffusers' `to_q/to_k/to_v`, `gate_layer`, `proj`, bit for bit.

    In place; returns the model. Processors go back to their diffusers classes; casting hooks carry over as in
    `fuse_projections`, with the same refusals.
    """
    todo = []
    for index, block in enumerate(_blocks(transformer)):
        if not hasattr(block.attn, ATTN_MERGED):
            continue
        attn_hook = checked_casting_hook(block.attn, index, (ATTN_MERGED,))
        mlp_hook = checked_casting_hook(block.img_mlp, index, (MLP_MERGED,), child=QWEN21_MLP)
        processor = _swapped_processor(block.attn.processor, _STANDARD_PROCESSOR, index)
        todo.append((block, attn_hook, mlp_hook, processor))
    for block, attn_hook, mlp_hook, processor in todo:
        attn, merged_mlp = block.attn, block.img_mlp
        remove_merged_parts(attn)
        for name, linear in zip(ATTN_PARTS, split_linear(getattr(attn, ATTN_MERGED), len(ATTN_PARTS)), strict=True):
            setattr(attn, name, carry_casting_hook(attn_hook, linear))
        delattr(attn, ATTN_MERGED)
        for name in [name for name in attn._modules if name not in ATTN_PARTS]:
            attn._modules[name] = attn._modules.pop(name)  # diffusers' order (to_q, to_k, to_v first): state_dict keys
        attn.__dict__.pop("set_processor", None)  # the class's own again
        attn.set_processor(processor)
        # Build diffusers' module without initialising weights it would throw away, then put the parts in.
        mlp = QwenImage21SwiGLUFeedForward.__new__(QwenImage21SwiGLUFeedForward)
        nn.Module.__init__(mlp)
        parts = split_linear(getattr(merged_mlp, MLP_MERGED), len(MLP_PARTS))
        linears = dict(zip(MLP_PARTS, (carry_casting_hook(mlp_hook, linear) for linear in parts), strict=True))
        # diffusers' registration order (proj, out, gate_layer) keeps state_dict() key order as in a fresh model.
        mlp.proj = linears["proj"]
        mlp.out = merged_mlp.out
        mlp.gate_layer = linears["gate_layer"]
        mlp.activation_fn = merged_mlp.activation_fn
        block.img_mlp = mlp
    invalidate_hook_caches(transformer)
    uninstall_model_api(transformer)  # the class's own save_pretrained, add_adapter, load_lora_adapter again
    return transformer


__all__ = [
    "MergedQwenImage21AttnProcessor",
    "MergedQwenImage21FlexAttnProcessor",
    "MergedSwiGLUFeedForward",
    "fuse_projections",
    "is_merged",
    "is_qwen21",
    "unfuse_projections",
]
