"""LoRA for the Qwen-Image transformer: target layouts (targets.py) and the PEFT adapter + export (adapter.py)."""

from fusedit.lora.adapter import add_lora, export_lora, lora_config, lora_parameters, lora_state_dict, lora_weights
from fusedit.lora.targets import NAMED_TARGETS, resolve_targets, translate_targets

__all__ = [
    "NAMED_TARGETS",
    "add_lora",
    "export_lora",
    "lora_config",
    "lora_parameters",
    "lora_state_dict",
    "lora_weights",
    "resolve_targets",
    "translate_targets",
]
