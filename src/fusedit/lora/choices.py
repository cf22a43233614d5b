"""The adapter choices `lora.type` and `lora.init`, and the rules on them (no torch, no PEFT).

Config validation (fusedit.training.validate_config) checks these before anything heavy loads; fusedit.lora.adapter
builds the adapters from them.
"""

from __future__ import annotations

INIT_CHOICES = ("default", "gaussian", "pissa", "olora")  # and PEFT's "pissa_niter_<k>" (randomised SVD)
# Initialisations that move part of the base weight into the adapter (W_res = W - scale * B0 @ A0), after PEFT's
# `init_lora_weights`: the export must subtract that part again (`lora_weights`).
BASE_CHANGING_INITS = ("pissa", "olora")


# lora.type: PEFT's LoRA, DoRA (LoraConfig(use_dora=True)), LoKr (LoKrConfig) and LoHa (LoHaConfig). LoKr and LoHa
# (the LyCORIS adapters, fusedit.lora.lycoris) are no B @ A: they are exported as the ComfyUI/LyCORIS keys
# (`lokr_w1`, `hada_w1_a`, ...) in the standard layout, which the LoRA reader does not take and infer.py applies as a
# dense update (fusedit.inference.lora, lora.fuse=true).
TYPES = ("lora", "dora", "lokr", "loha")
LYCORIS_TYPES = ("lokr", "loha")


def check_type(adapter_type: str) -> None:
    """ValueError unless `adapter_type` is one of TYPES."""
    if adapter_type not in TYPES:
        raise ValueError(f"lora.type must be one of {TYPES}, got {adapter_type!r}")


def lycoris_problems(adapter_type: str, init, init_from, dropout, use_rslora, fp8: str, export_layouts) -> list[str]:
    """What a LoKr / LoHa adapter cannot be combined with (one message each; empty for other types).

    PEFT's LoKr/LoHa have their own initialisation (no PiSSA/OLoRA/gaussian, no LoRA file to start from), no input
    dropout and no rsLoRA scale; fp8 storage is not wrapped by PEFT's LyCORIS layers; their export is the standard
    layout only (ComfyUI knows no merged to_qkv).
    """
    if adapter_type not in LYCORIS_TYPES:
        return []
    name = f"lora.type={adapter_type}"
    problems = []
    if init not in (None, "default") or init_from:
        problems.append(f"{name} starts from PEFT's own initialisation: set lora.init=default and lora.init_from=null")
    if dropout:
        problems.append(f"{name} has no input dropout (PEFT's LoKr/LoHa): set lora.dropout=0")
    if use_rslora:
        problems.append(f"{name} scales by alpha / rank only: set lora.use_rslora=false")
    if fp8 not in (None, "none"):
        problems.append(f"{name} needs an nn.Linear base (PEFT): use precision=bf16 or fp32, not fp8")
    if any(layout not in (None, "standard") for layout in export_layouts):
        problems.append(
            f"{name} is exported in the standard layout only (ComfyUI's keys): callbacks.lora_export.layout=standard "
            "and merged_copy=false"
        )
    return problems


def check_init(init: str) -> None:
    """ValueError unless `init` is one of INIT_CHOICES or PEFT's `pissa_niter_<k>` (k >= 1)."""
    niter = init.removeprefix("pissa_niter_") if isinstance(init, str) and init.startswith("pissa_niter_") else None
    if init not in INIT_CHOICES and not (niter is not None and niter.isdigit() and int(niter) >= 1):
        raise ValueError(f"lora.init must be one of {INIT_CHOICES} or pissa_niter_<k>, got {init!r}")


def changes_base(init: str) -> bool:
    return isinstance(init, str) and init.startswith(BASE_CHANGING_INITS)
