"""Lossless conversion of Qwen-Image checkpoints and LoRAs between the standard and the merged-QKV layout,
and between LoRA file formats. See docs/conversion.md."""

from .cli import add_cli
from .files import convert_checkpoint, write_lora
from .layout import DIRECTIONS, MERGED, STANDARD, TO_MERGED, TO_STANDARD
from .lora_formats import FORMATS, LoraModule, LoraWeights, read_lora
from .lora_qkv import convert_lora_layout
from .state_dict import convert_state_dict

__all__ = [
    "DIRECTIONS",
    "FORMATS",
    "MERGED",
    "STANDARD",
    "TO_MERGED",
    "TO_STANDARD",
    "LoraModule",
    "LoraWeights",
    "add_cli",
    "convert_checkpoint",
    "convert_lora_layout",
    "convert_state_dict",
    "read_lora",
    "write_lora",
]
