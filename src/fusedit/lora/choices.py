"""The adapter choices `lora.type` and `lora.init`, and the rules on them (no torch, no PEFT).

Config validation (fusedit.training.validate_config) checks these before anything heavy loads; fusedit.lora.adapter
builds the adapters from them.
"""

from __future__ import annotations

INIT_CHOICES = ("default", "gaussian", "pissa", "olora")  # and PEFT's "pissa_niter_<k>" (randomised SVD)
# Initialisations that move part of the base weight into the adapter (W_res = W - scale * B0 @ A0), after PEFT's
# `init_lora_weights`: the export must subtract that part again (`lora_weights`).
BASE_CHANGING_INITS = ("pissa", "olora")


# lora.type: PEFT's LoRA and DoRA (LoraConfig(use_dora=True)). LoKr and LoHa are refused (UNSUPPORTED_TYPES): fusedit
# writes adapters as diffusers LoRA files, and their Kronecker / Hadamard factors are no B @ A; on the merged to_qkv
# they factorise the stacked [3d, d] matrix as a whole, which does not split into per-q/k/v factors at all.
TYPES = ("lora", "dora")
UNSUPPORTED_TYPES = {
    "lokr": "a LoKr's Kronecker factors",
    "loha": "a LoHa's Hadamard factors",
}


def check_type(adapter_type: str) -> None:
    """ValueError naming why for a `lora.type` fusedit cannot train and export."""
    if adapter_type in UNSUPPORTED_TYPES:
        raise ValueError(
            f"lora.type={adapter_type} is not supported: fusedit exports diffusers LoRA files (lora_A / lora_B), and "
            f"{UNSUPPORTED_TYPES[adapter_type]} are not low-rank factors (on the merged to_qkv they factorise the "
            "stacked q/k/v matrix, which does not split per projection); use lora.type=lora or dora"
        )
    if adapter_type not in TYPES:
        raise ValueError(f"lora.type must be one of {TYPES}, got {adapter_type!r}")


def check_init(init: str) -> None:
    """ValueError unless `init` is one of INIT_CHOICES or PEFT's `pissa_niter_<k>` (k >= 1)."""
    niter = init.removeprefix("pissa_niter_") if isinstance(init, str) and init.startswith("pissa_niter_") else None
    if init not in INIT_CHOICES and not (niter is not None and niter.isdigit() and int(niter) >= 1):
        raise ValueError(f"lora.init must be one of {INIT_CHOICES} or pissa_niter_<k>, got {init!r}")


def changes_base(init: str) -> bool:
    return isinstance(init, str) and init.startswith(BASE_CHANGING_INITS)
