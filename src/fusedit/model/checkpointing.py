"""Activation checkpointing of the transformer blocks, optionally with the saved inputs offloaded to the CPU.

`checkpoint_blocks(model, every, offload)` recomputes every `every`-th block in the backward pass. All blocks use
diffusers' own switch (`enable_gradient_checkpointing`); every k-th block patches that block's `forward` on the
instance rather than wrapping the module, so parameter names (and thus LoRA keys and checkpoints) do not change.
`offloaded_checkpoint` is `torch.utils.checkpoint.checkpoint` (non-reentrant) with the saved block inputs moved to
CPU (`torch.autograd.graph.save_on_cpu`), so checkpointing every block costs almost no device memory for
activations.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def checkpointed_forward(function, *args, **kwargs):
    """`function(*args, **kwargs)` under a non-reentrant activation checkpoint (plain call when grad is off)."""
    if torch.is_grad_enabled():
        return checkpoint(function, *args, use_reentrant=False, **kwargs)
    return function(*args, **kwargs)


def offloaded_checkpoint(function, *args, pin_memory: bool | None = None, **kwargs):
    """Non-reentrant activation checkpoint whose saved inputs live on the CPU until the backward pass needs them.

    Inside the checkpointed region nothing is saved (it is recomputed); what checkpointing keeps is the region's
    inputs, and `save_on_cpu` moves those. Drop-in for diffusers' `gradient_checkpointing_func` and for
    `torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`.
    """
    if not torch.is_grad_enabled():
        return function(*args, **kwargs)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    with torch.autograd.graph.save_on_cpu(pin_memory=pin_memory):
        return checkpointed_forward(function, *args, **kwargs)


def use_offloaded_checkpoints(model: nn.Module, pin_memory: bool | None = None) -> nn.Module:
    """Switch a model whose every block is checkpointed (diffusers' `enable_gradient_checkpointing`) to offload."""
    if not getattr(model, "gradient_checkpointing", False):
        raise ValueError(
            "checkpoint offload needs activation checkpointing of every block first (checkpoint_blocks(model, every=1))"
        )
    model.enable_gradient_checkpointing(
        gradient_checkpointing_func=functools.partial(offloaded_checkpoint, pin_memory=pin_memory)
    )
    return model


def checkpoint_blocks(model: nn.Module, every: int = 1, offload: bool = False) -> nn.Module:
    """Recompute every `every`-th transformer block in the backward pass (1 = all blocks, 0 = none), in place.

    `offload` keeps the checkpointed blocks' saved inputs in (pinned) CPU memory until backward. Raises ValueError
    for a negative `every`, or `offload` without checkpointing.
    """
    if every < 0:
        raise ValueError(f"activation checkpointing interval must be >= 0, got {every}")
    if offload and every == 0:
        raise ValueError("model.checkpoint_offload=true needs model.activation_checkpointing >= 1")
    if every == 1:
        model.enable_gradient_checkpointing(
            **({"gradient_checkpointing_func": offloaded_checkpoint} if offload else {})
        )
    elif every > 1:
        wrapper = offloaded_checkpoint if offload else checkpointed_forward
        for index, block in enumerate(model.transformer_blocks):
            if index % every == 0:
                block.forward = functools.partial(wrapper, block.forward)
    return model
