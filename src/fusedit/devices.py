"""Dtype and device names, as configs and command-line flags spell them, to torch objects: the one table and the
one rule (`precision.*_dtype`, `profile.dtype`, `cache.device`, `profile.device`, `fusedit bench --dtype`)."""

from __future__ import annotations

import torch

from fusedit.errors import UserInputError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}  # fmt: skip


def to_dtype(name: str | torch.dtype | None, key: str = "dtype") -> torch.dtype | None:
    """The torch dtype named `name` (a dtype or None passes through); UserInputError naming `key` otherwise."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise UserInputError(f"{key} must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def resolve_device(requested: str, key: str = "device", on_cpu: str | None = None) -> torch.device:
    """`auto` -> the current CUDA device when there is one, else the CPU; any other name -> `torch.device(name)`.

    Raises UserInputError naming `key` for a name torch does not know, and for a CUDA device on a machine without
    one (before any model loads, rather than as a CUDA error mid-run); `on_cpu` is the override the message offers
    (default `<key>=cpu`).
    """
    if requested == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError) as error:
        raise UserInputError(f"{key}={requested!r} is not a device: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError(f"{key}={requested} but no CUDA GPU is available; use {on_cpu or f'{key}=cpu'}")
    return device
