"""Pickled weight files (`torch.save`, `.bin`, `.pt`, ...): recognised from the suffix or the first bytes, and refused.

Loading a pickle runs whatever code it names, so fusedit reads weights and LoRAs from safetensors only. Torch-free:
the light preflights (`python infer.py` before torch is imported) use it too.
"""

from __future__ import annotations

import os
from pathlib import Path

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def pickle_refusal(path: str | os.PathLike) -> str | None:
    """Why `path` is refused when it is a pickle (`torch.save` zip, plain pickle or a pickle suffix), else None.

    One line, for a `fusedit: error:`; pickles are refused because loading one runs whatever code it names.
    """
    path = Path(path)
    with open(path, "rb") as handle:
        start = handle.read(9)
    # torch.save writes a zip archive ("PK\x03\x04"); plain pickles (protocol >= 2) start with 0x80. A safetensors
    # file may start with either byte pattern (its first 8 bytes are the header length), but its 9th byte is "{".
    safetensors_like = start[8:9] == b"{"
    pickled = start.startswith(b"PK\x03\x04") or start[:1] == b"\x80"
    if path.suffix.lower() in PICKLE_SUFFIXES or (pickled and not safetensors_like):
        return (
            f"{path} is a pickle file (torch.save / .bin), which fusedit never loads because unpickling runs "
            "arbitrary code; re-save it as .safetensors (safetensors.torch.save_file) where it was made"
        )
    return None
