"""Crash-safe file writing and safe tensor reading.

Every file fusedit writes goes through `atomic_write_path`: the content is written to a temporary file in the
same directory, fsynced, and renamed over the target. A process killed at any moment leaves either the old file
or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fusedit.errors import UserInputError


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files readable by their owner only; a LoRA or an image should get the permissions any other
# new file gets (0666 minus the umask), or nobody else on a shared cluster can read the results.
_NEW_FILE_MODE = 0o666 & ~current_umask()


def fsync_dir(directory: Path) -> None:
    # The rename is only durable once the directory entry is flushed too.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_write_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success fsync it and rename it to `path`.

    On any exception the temporary file is removed and `path` is left untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, _NEW_FILE_MODE)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_write_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def save_safetensors_atomic(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """`safetensors.torch.save_file`, but crash-safe. Tensors are made contiguous (views of fused weights are not)."""
    contiguous = {key: value.contiguous() for key, value in tensors.items()}
    with atomic_write_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata=dict(metadata) if metadata else None)


def load_safetensors(path: str | os.PathLike, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read every tensor and the metadata of one safetensors file."""
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt", device=device) as handle:
        metadata = dict(handle.metadata() or {})
        for key in handle.keys():
            tensors[key] = handle.get_tensor(key)
    return tensors, metadata


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str]]:
    """Shapes and dtypes of every tensor plus the metadata, without reading any tensor data."""
    path = Path(path)
    with open(path, "rb") as handle:
        raw_len = handle.read(8)
        if len(raw_len) != 8:
            raise UserInputError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        header_len = int.from_bytes(raw_len, "little")
        if header_len <= 0 or header_len > 100 * 1024 * 1024 or header_len + 8 > path.stat().st_size:
            raise UserInputError(f"{path}: not a safetensors file (implausible header length {header_len})")
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UserInputError(f"{path}: not a safetensors file (header is not JSON: {error})") from None
    metadata = header.pop("__metadata__", None) or {}
    return header, metadata
