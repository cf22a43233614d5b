"""`convert_state_dict`: one entry point for model weights and LoRAs, in any layout and LoRA format."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from fusedit.errors import UserInputError

from .layout import DIRECTIONS, TARGET_LAYOUT, model_layout, plan_model_conversion
from .lora_formats import classify_keys, lora_from_state_dict, lora_to_state_dict
from .lora_qkv import convert_lora_layout

log = logging.getLogger(__name__)


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor], direction: str, metadata: Mapping[str, str] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Convert a Qwen-Image transformer state dict or LoRA between the standard and the merged-QKV layout.

    Recognises by itself whether it holds model weights or a LoRA, the layout, and the LoRA key format, and
    answers in the same format (key prefixes kept). Model tensors are copied, concatenated or sliced exactly.
    A LoRA comes back with its alpha stored where its format keeps it and in `metadata` (save that metadata
    with the tensors). Already in the target layout: returned unchanged (logged).
    """
    if direction not in DIRECTIONS:
        raise UserInputError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    metadata = dict(metadata or {})
    target = TARGET_LAYOUT[direction]
    if classify_keys(state_dict) == "lora":
        lora = lora_from_state_dict(state_dict, metadata)
        if lora.layout in (None, target):
            log.info("LoRA is already in the %s layout (or has no q/k/v modules); nothing to convert", target)
            return dict(state_dict), metadata
        return lora_to_state_dict(convert_lora_layout(lora, direction))
    layout = model_layout(state_dict)
    if layout is None:
        raise UserInputError(
            "state dict has no Qwen-Image attention projections (…attn.to_q / …attn.to_qkv); keys look like: "
            + ", ".join(list(state_dict)[:5])
        )
    if layout == target:
        log.info("model state dict is already in the %s layout; nothing to convert", target)
        return dict(state_dict), metadata
    plan = plan_model_conversion({k: (v.dtype, tuple(v.shape)) for k, v in state_dict.items()}, direction)
    return {entry.name: entry.build(state_dict.__getitem__) for entry in plan}, metadata
