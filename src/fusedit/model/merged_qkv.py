"""The merged-QKV Qwen-Image transformer: diffusers' model with one QKV GEMM per stream.

`fuse_qkv` rewrites diffusers' `QwenImageTransformer2DModel` in place: in every block the image-stream
projections `attn.to_q/to_k/to_v` become one `attn.to_qkv` (weight = cat[Wq; Wk; Wv]) and the text-stream
projections `attn.add_q_proj/add_k_proj/add_v_proj` become one `attn.add_qkv_proj`. The block's attention
processor is swapped for `MergedQKVAttnProcessor`, which issues one matmul per stream and splits q/k/v as views.
`unfuse_qkv` slices the merged weights back into the original three Linears, bit for bit.

We do not fork the model: everything except the QKV projections (modulation, norms, RoPE, attention dispatch,
output projections, MLPs, the model's forward) is diffusers' own code.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_qwenimage import (
    QwenDoubleStreamAttnProcessor2_0,
    apply_rotary_emb_qwen,
)
from torch import nn

from fusedit.model import merged_qwen21
from fusedit.model.diffusers_api import install_merged_api, uninstall_merged_api
from fusedit.model.linear_merge import (
    carry_casting_hook,
    checked_casting_hook,
    invalidate_hook_caches,
    merge_linears,
    split_linear,
)
from fusedit.model.module_map import QKV_GROUPS

IMAGE_MERGED = "to_qkv"


class MergedQKVAttnProcessor:
    """Joint text/image attention of Qwen-Image with fused QKV projections.

    Same math as diffusers' `QwenDoubleStreamAttnProcessor2_0`; the only difference is that q, k and v of each
    stream come out of one GEMM (`attn.to_qkv`, `attn.add_qkv_proj`). `set_attention_backend` keeps working
    because the attention call goes through diffusers' `dispatch_attention_fn`. `__call__` follows diffusers'
    processor line for line so the two can be diffed; that is why it is one function over 60 lines
    (tests/test_imports.py's LONG_ON_PURPOSE).
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if encoder_hidden_states is None:
            raise ValueError("MergedQKVAttnProcessor requires encoder_hidden_states (the text stream)")
        if attention_mask is not None:
            raise ValueError("Pass encoder_hidden_states_mask; the processor builds the joint mask itself.")

        if encoder_hidden_states_mask is not None:
            image_mask = hidden_states.new_ones(hidden_states.shape[:2], dtype=torch.bool)
            attention_mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)[:, None, None, :]

        head_dim = attn.inner_dim // attn.heads
        img_query, img_key, img_value = attn.to_qkv(hidden_states).unflatten(-1, (3, -1, head_dim)).unbind(2)
        txt_query, txt_key, txt_value = (
            attn.add_qkv_proj(encoder_hidden_states).unflatten(-1, (3, -1, head_dim)).unbind(2)
        )

        if attn.norm_q is not None:
            img_query = attn.norm_q(img_query)
        if attn.norm_k is not None:
            img_key = attn.norm_k(img_key)
        if attn.norm_added_q is not None:
            txt_query = attn.norm_added_q(txt_query)
        if attn.norm_added_k is not None:
            txt_key = attn.norm_added_k(txt_key)

        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            img_query = apply_rotary_emb_qwen(img_query, img_freqs, use_real=False)
            img_key = apply_rotary_emb_qwen(img_key, img_freqs, use_real=False)
            txt_query = apply_rotary_emb_qwen(txt_query, txt_freqs, use_real=False)
            txt_key = apply_rotary_emb_qwen(txt_key, txt_freqs, use_real=False)

        # Joint attention over [text, image], as diffusers orders it.
        joint_query = torch.cat([txt_query, img_query], dim=1)
        joint_key = torch.cat([txt_key, img_key], dim=1)
        joint_value = torch.cat([txt_value, img_value], dim=1)
        joint_hidden_states = dispatch_attention_fn(
            joint_query,
            joint_key,
            joint_value,
            attn_mask=attention_mask,
            dropout_p=0.0,
            is_causal=False,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        joint_hidden_states = joint_hidden_states.flatten(2, 3).to(joint_query.dtype)

        seq_txt = encoder_hidden_states.shape[1]
        txt_attn_output = joint_hidden_states[:, :seq_txt, :]
        img_attn_output = joint_hidden_states[:, seq_txt:, :]

        img_attn_output = attn.to_out[0](img_attn_output.contiguous())
        if len(attn.to_out) > 1:
            img_attn_output = attn.to_out[1](img_attn_output)  # dropout
        txt_attn_output = attn.to_add_out(txt_attn_output.contiguous())
        return img_attn_output, txt_attn_output


def attention_modules(transformer: nn.Module) -> list[nn.Module]:
    blocks = getattr(transformer, "transformer_blocks", None)
    if blocks is None:
        raise TypeError(f"{type(transformer).__name__} has no transformer_blocks; expected a Qwen-Image transformer")
    return [block.attn for block in blocks]


def is_merged(transformer: nn.Module) -> bool:
    """True when every block of `transformer` carries the merged projections."""
    if merged_qwen21.is_qwen21(transformer):
        return merged_qwen21.is_merged(transformer)
    return all(hasattr(attn, IMAGE_MERGED) for attn in attention_modules(transformer))


def fuse_qkv(transformer: nn.Module) -> nn.Module:
    """Merge q/k/v projections of every block in place (a no-op for an already merged model). Returns the model.

    Works on any storage dtype, float8 included, and keeps diffusers' layerwise casting (the merged layer gets the
    hook its parts had). Every block is checked before any is changed: a refusal (TypeError for a layer that is not
    a plain Linear, RuntimeError for hooks other than layerwise casting) leaves the model as it was.
    A Qwen-Image-2.1 transformer goes to `fusedit.model.merged_qwen21.fuse_projections` (q/k/v and SwiGLU gate/up).
    """
    if merged_qwen21.is_qwen21(transformer):
        return merged_qwen21.fuse_projections(transformer)
    todo = []
    for block, attn in enumerate(attention_modules(transformer)):
        if not hasattr(attn, IMAGE_MERGED):
            hooks = {merged: checked_casting_hook(attn, block, names) for merged, names in QKV_GROUPS.items()}
            todo.append((attn, hooks))
    for attn, hooks in todo:
        for merged_name, names in QKV_GROUPS.items():
            merged = merge_linears([getattr(attn, name) for name in names])
            for name in names:
                # Attention keeps `to_k`/`to_v` etc. as attributes; deleting frees the memory right away.
                delattr(attn, name)
            setattr(attn, merged_name, carry_casting_hook(hooks[merged_name], merged))
        attn.set_processor(MergedQKVAttnProcessor())
    invalidate_hook_caches(transformer)
    install_merged_api(transformer, attention_modules(transformer), MergedQKVAttnProcessor)
    return transformer


def unfuse_qkv(transformer: nn.Module) -> nn.Module:
    """Split merged projections of every block back into exact q/k/v Linears in place. Returns the model.

    Bit for bit in every dtype; layerwise casting is carried over as in `fuse_qkv`, with the same refusals.
    A Qwen-Image-2.1 transformer goes to `fusedit.model.merged_qwen21.unfuse_projections`.
    """
    if merged_qwen21.is_qwen21(transformer):
        return merged_qwen21.unfuse_projections(transformer)
    todo = []
    for block, attn in enumerate(attention_modules(transformer)):
        if hasattr(attn, IMAGE_MERGED):
            hooks = {merged: checked_casting_hook(attn, block, (merged,)) for merged in QKV_GROUPS}
            todo.append((attn, hooks))
    uninstall_merged_api(transformer, attention_modules(transformer))
    for attn, hooks in todo:
        for merged_name, names in QKV_GROUPS.items():
            for name, linear in zip(names, split_linear(getattr(attn, merged_name)), strict=True):
                setattr(attn, name, carry_casting_hook(hooks[merged_name], linear))
            delattr(attn, merged_name)
        attn.set_processor(QwenDoubleStreamAttnProcessor2_0())
    invalidate_hook_caches(transformer)
    return transformer
