"""Optimizers for the LoRA parameters, and the bytes of state each keeps per trainable parameter (for the planner).

- `adamw`: `torch.optim.AdamW`; two fp32 moments per parameter (8 bytes).
- `adamw8bit`: bitsandbytes' `AdamW8bit` (blockwise-quantised moments, Dettmers et al. 2022, "8-bit Optimizers via
  Block-wise Quantization"): two uint8 moments plus one fp32 absmax per block of 256 per moment, ~2.03 bytes per
  parameter. Tensors under `min_8bit_size` elements (bitsandbytes' default 4096) keep fp32 moments. bitsandbytes is
  an optional dependency (`pip install 'fusedit[lowmem]'`); its state is plain tensors, so Lightning checkpoints of
  it load with `weights_only=True`. It runs on CPU too (bitsandbytes >= 0.45 has CPU kernels for its optimizers).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from fusedit.errors import UserInputError

BITSANDBYTES_HINT = "optim=adamw8bit needs bitsandbytes: pip install 'fusedit[lowmem]' (or pip install bitsandbytes)"
_BLOCK = 256  # bitsandbytes' blockwise quantisation block for optimizer states

# Optimizer state bytes per trainable parameter, by `optim.name` (fp32 LoRA weights).
STATE_BYTES_PER_PARAMETER = {"adamw": 8.0, "adamw8bit": 2 * (1 + 4 / _BLOCK)}


def bitsandbytes_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def adamw_8bit(params: Iterable[torch.nn.Parameter], **kwargs) -> torch.optim.Optimizer:
    """bitsandbytes.optim.AdamW8bit over `params` (kwargs as torch.optim.AdamW's). Raises UserInputError when
    bitsandbytes is not installed."""
    try:
        from bitsandbytes.optim import AdamW8bit
    except ImportError as error:
        raise UserInputError(BITSANDBYTES_HINT) from error
    if "betas" in kwargs:
        # Hydra passes a ListConfig; bitsandbytes keeps it in param_groups, and a checkpoint holding it would not
        # load with weights_only=True.
        kwargs["betas"] = tuple(float(beta) for beta in kwargs["betas"])
    return AdamW8bit(params, **kwargs)
