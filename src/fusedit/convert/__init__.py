"""Lossless conversion of Qwen-Image checkpoints and LoRAs between the standard and the merged-QKV layout,
and between LoRA file formats. See docs/conversion.md.

The names below are imported on first use, so that `fusedit detect` can read layouts and LoRA key styles from
`fusedit.convert.layout` / `.lora_formats` without this package importing the tensor converters (and torch).
"""

from fusedit._lazy import lazy_getattr

_EXPORTS = {
    "add_cli": "fusedit.convert.cli",
    "convert_checkpoint": "fusedit.convert.files",
    "write_lora": "fusedit.convert.files",
    **dict.fromkeys(("DIRECTIONS", "MERGED", "STANDARD", "TO_MERGED", "TO_STANDARD"), "fusedit.convert.layout"),
    **dict.fromkeys(("FORMATS", "LoraModule", "LoraWeights", "read_lora"), "fusedit.convert.lora_formats"),
    "convert_lora_layout": "fusedit.convert.lora_qkv",
    "convert_state_dict": "fusedit.convert.state_dict",
}

__getattr__ = lazy_getattr(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
