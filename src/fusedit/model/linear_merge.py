"""Rebuilding Linears for the merged layouts: concatenate several Linears into one and split it back, exactly, in
any storage dtype, carrying diffusers' layerwise-casting hook and refusing what cannot be rebuilt (LoRA wrappers,
accelerate placement, other diffusers hooks). Shared by fusedit.model.merged_qkv (the MMDiT) and
fusedit.model.merged_qwen21 (Qwen-Image-2.1).
"""

from __future__ import annotations

import torch
from diffusers.hooks.layerwise_casting import _LAYERWISE_CASTING_HOOK, apply_layerwise_casting_hook
from torch import nn


def linear_like(template: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A Linear holding exactly `weight` / `bias` (with `template`'s requires_grad), built without initialising.

    `skip_init` builds on the meta device, so no random init runs: it would waste time on 20B weights and torch
    has none for float8 storage dtypes (`enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn)`).
    """
    out_features, in_features = weight.shape
    linear = torch.nn.utils.skip_init(
        nn.Linear, in_features, out_features, bias=bias is not None, device="meta", dtype=weight.dtype
    )
    linear.weight = nn.Parameter(weight, requires_grad=template.weight.requires_grad)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=template.bias.requires_grad)
    return linear


def merge_linears(linears: list[nn.Linear]) -> nn.Linear:
    first = linears[0]
    for other in linears[1:]:
        if other.in_features != first.in_features or (other.bias is None) != (first.bias is None):
            raise ValueError("the projections to merge disagree in input size or bias; cannot merge them")
    with torch.no_grad():  # torch.cat is exact in every dtype (float8 included) and shape-only on meta
        weight = torch.cat([linear.weight for linear in linears], dim=0)
        bias = None if first.bias is None else torch.cat([linear.bias for linear in linears], dim=0)
    return linear_like(first, weight, bias)


def split_linear(merged: nn.Linear, parts: int = 3) -> list[nn.Linear]:
    if merged.out_features % parts:
        raise ValueError(f"merged projection has {merged.out_features} outputs, not divisible by {parts}")
    out_features = merged.out_features // parts
    linears = []
    with torch.no_grad():
        for index in range(parts):
            rows = slice(index * out_features, (index + 1) * out_features)
            # clone: a view would keep the whole merged tensor alive after the merged layer is gone
            bias = None if merged.bias is None else merged.bias[rows].clone()
            linears.append(linear_like(merged, merged.weight[rows].clone(), bias))
    return linears


def casting_hook(linear: nn.Linear, where: str):
    """The diffusers layerwise-casting hook on `linear` (None when it has none); any other hook is refused."""
    if hasattr(linear, "_hf_hook"):
        raise RuntimeError(
            f"{where} is placed by accelerate (device_map / cpu offload): fuse/unfuse the projections before "
            "dispatching the model"
        )
    registry = getattr(linear, "_diffusers_hook", None)
    if registry is None:
        return None
    others = sorted(set(registry.hooks) - {_LAYERWISE_CASTING_HOOK})
    if others:
        raise RuntimeError(
            f"{where} carries diffusers hooks {others}: fuse/unfuse the projections before enabling them "
            "(group offloading, caches, ... are applied after fuse_qkv)"
        )
    return registry.get_hook(_LAYERWISE_CASTING_HOOK)


def carry_casting_hook(hook, linear: nn.Linear) -> nn.Linear:
    # The new layer is already in the storage dtype (built from the stored tensors); the hook casts it to the
    # compute dtype around each forward exactly as it did for the layers it replaces.
    if hook is not None:
        apply_layerwise_casting_hook(linear, hook.storage_dtype, hook.compute_dtype, hook.non_blocking)
    return linear


def invalidate_hook_caches(transformer: nn.Module) -> None:
    # Hook registries cache the registries below them; replacing hooked layers stales those lists.
    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None:
            registry.invalidate_child_registries_cache()


def checked_casting_hook(parent: nn.Module, block: int, names: tuple[str, ...], child: str = "attn"):
    """The casting hook shared by the layers `names` of `parent` (None if uncast), the block's `child` module
    (`attn`, or Qwen-Image-2.1's `img_mlp`); refuses what cannot be rebuilt."""
    hooks = []
    for name in names:
        module = getattr(parent, name)
        where = f"transformer_blocks.{block}.{child}.{name}"
        if type(module) is not nn.Linear:
            raise TypeError(
                f"{where} is a {type(module).__name__}, not a plain nn.Linear: fuse/unfuse the projections before "
                "casting, quantizing (fp8 storage) or adding LoRA adapters (fusedit.lora.targets translates target "
                "names between the layouts)"
            )
        hook = casting_hook(module, where)
        hooks.append(None if hook is None else (hook.storage_dtype, hook.compute_dtype, hook.non_blocking))
    if len(set(hooks)) > 1:
        raise RuntimeError(
            f"transformer_blocks.{block}.{child}: {', '.join(names)} are cast differently ({hooks}); cannot merge them"
        )
    return casting_hook(getattr(parent, names[0]), "")
