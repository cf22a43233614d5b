"""LoRA for the Qwen-Image transformer: target layouts (targets.py) and the PEFT adapter + export (adapter.py).

The names below are imported on first use: config validation needs only `targets`, and must not load PEFT.
"""

_EXPORTS = {
    "add_lora": "fusedit.lora.adapter",
    "export_lora": "fusedit.lora.adapter",
    "lora_config": "fusedit.lora.adapter",
    "lora_parameters": "fusedit.lora.adapter",
    "lora_state_dict": "fusedit.lora.adapter",
    "lora_weights": "fusedit.lora.adapter",
    "NAMED_TARGETS": "fusedit.lora.targets",
    "resolve_targets": "fusedit.lora.targets",
    "translate_targets": "fusedit.lora.targets",
}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fusedit.lora' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
