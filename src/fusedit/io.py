"""Crash-safe file writing and safe tensor reading.

Every file fusedit writes goes through `atomic_write_path`: the content is written to a temporary file in the
same directory, fsynced, and renamed over the target. A process killed at any moment leaves either the old file
or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import safe_open

from fusedit.errors import Refusal, UserInputError

if TYPE_CHECKING:  # torch is imported by the functions that touch tensors: `fusedit detect` reads headers only
    import torch


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


# A write that failed for lack of room: the disk (ENOSPC), the user's quota (EDQUOT) or the file size limit (EFBIG).
_STORAGE_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _storage_full_cause(error: BaseException | None) -> int | None:
    # torch's zip writer re-raises a failed write as a RuntimeError during its cleanup; the OSError is its context.
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, OSError) and error.errno in _STORAGE_FULL:
            return error.errno
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


class StorageFullError(Refusal, OSError):
    """No room to write a file ("No space left on device while writing <file>"); the old file, if any, is intact."""

    def __str__(self) -> str:
        return str(self.strerror)  # without OSError's "[Errno 28]" prefix: the message already says it


@contextlib.contextmanager
def atomic_write_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success fsync it and rename it to `path`.

    On any exception the temporary file is removed and `path` is left untouched. A full disk or quota is raised as
    StorageFullError naming `path` (a writer that reports it as OSError: pass it a file object, not a path).
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
    except Exception as error:
        full = _storage_full_cause(error)
        if full is not None:
            raise StorageFullError(full, f"{os.strerror(full)} while writing {target}") from error
        raise
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
    from safetensors.torch import save_file  # imports torch

    contiguous = {key: value.contiguous() for key, value in tensors.items()}
    with atomic_write_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata=dict(metadata) if metadata else None)


def load_safetensors(path: str | os.PathLike, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read every tensor and the metadata of one safetensors file (imports torch: safetensors' "pt" framework)."""
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt", device=device) as handle:
        metadata = dict(handle.metadata() or {})
        for key in handle.keys():
            tensors[key] = handle.get_tensor(key)
    return tensors, metadata


# Bytes per element of every safetensors dtype fusedit reads (the format's own names, safetensors' Dtype enum).
SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit


class SafetensorsHeaderError(UserInputError):
    """A file that is not a well-formed safetensors file; the message names the file and the entry at fault."""


def _header_problem(name: str, entry, data_bytes: int) -> str | None:
    """Why header entry `name` is malformed, or None. Checks what safetensors' own reader checks, plus sizes."""
    if not isinstance(entry, dict):
        return f"entry {name!r} is not an object"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in SAFETENSORS_DTYPE_BYTES:
        return f"tensor {name!r} has an unknown dtype {dtype!r}"
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        return f"tensor {name!r} has an invalid shape {shape!r}"
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        return f"tensor {name!r} has invalid data_offsets {offsets!r}"
    if offsets[1] > data_bytes:
        return f"tensor {name!r} ends at byte {offsets[1]} of a {data_bytes}-byte data section (truncated file?)"
    expected = math.prod(shape) * SAFETENSORS_DTYPE_BYTES[dtype]
    if offsets[1] - offsets[0] != expected:
        return (
            f"tensor {name!r} ({dtype} {shape}) needs {expected} bytes but its data_offsets span "
            f"{offsets[1] - offsets[0]}"
        )
    return None


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str]]:
    """Shapes, dtypes and data offsets of every tensor plus the metadata, without reading any tensor data.

    Returns ({name: {"dtype", "shape", "data_offsets"}}, {metadata key: value}). The header is validated the way
    safetensors' own reader does before any tensor is touched, so every caller (detect, convert, the model loader,
    the cache) refuses a damaged or hostile file with one message: SafetensorsHeaderError (a ValueError) naming
    the file and the entry, for a header that is not a JSON object, metadata that is not {str: str}, an unknown
    dtype, a shape or offsets that are not non-negative integers, a tensor whose byte span does not match its
    shape and dtype, tensors that overlap, or data that ends past the end of the file (truncated).
    """
    path = Path(path)

    def refuse(reason: str) -> SafetensorsHeaderError:
        return SafetensorsHeaderError(f"{path}: not a safetensors file ({reason})")

    with open(path, "rb") as handle:
        raw_len = handle.read(8)
        if len(raw_len) != 8:
            raise refuse("shorter than its 8-byte header length")
        header_len = int.from_bytes(raw_len, "little")
        file_size = os.fstat(handle.fileno()).st_size
        if header_len <= 0 or header_len > MAX_HEADER_BYTES or header_len + 8 > file_size:
            raise refuse(f"implausible header length {header_len} for a {file_size}-byte file")
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise refuse(f"header is not JSON: {error}") from None
    if not isinstance(header, dict):
        raise refuse(f"header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(key, str) and isinstance(value, str) for key, value in metadata.items()
    ):
        raise refuse("__metadata__ is not an object of strings")
    data_bytes = file_size - 8 - header_len
    for name, entry in header.items():
        problem = _header_problem(name, entry, data_bytes)
        if problem:
            raise refuse(problem)
    spans = sorted((entry["data_offsets"][0], entry["data_offsets"][1], name) for name, entry in header.items())
    for (_, end, name), (start, _, next_name) in zip(spans, spans[1:], strict=False):
        if start < end:
            raise refuse(f"tensors {name!r} and {next_name!r} overlap (bytes {start}..{end})")
    return header, metadata
