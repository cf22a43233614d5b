"""LoRA for the Qwen-Image transformer: target layouts (targets.py) and the PEFT adapter + export (adapter.py).

The names below are imported on first use: config validation needs only `targets`, and must not load PEFT.
"""

from fusedit._lazy import lazy_getattr

_EXPORTS = {
    "add_lora": "fusedit.lora.adapter",
    "export_lora": "fusedit.lora.adapter",
    "lora_parameters": "fusedit.lora.adapter",
    "lora_weights": "fusedit.lora.adapter",
    "NAMED_TARGETS": "fusedit.lora.targets",
    "resolve_targets": "fusedit.lora.targets",
}


__getattr__ = lazy_getattr(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
