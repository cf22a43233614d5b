"""The on-disk cache: safetensors shards of encoded rows plus one JSON index, per encoder fingerprint.

    <cache dir>/<fingerprint hash[:16]>/
        encoder.json                 the fingerprint (what these encodings depend on), for people and checks
        index.json                   row key -> {shard, latent shapes, prompt length, sha256 of the row's bytes}
        shard-000000.safetensors     rows as tensors "<key>/target", "<key>/edit.<i>", "<key>/prompt"
        .lock                        held while a writer adds rows

Shards and the index are written atomically (fusedit.io), the shard before the index entries that point into it:
a writer killed at any moment leaves either no entry or a complete shard. What atomic writes cannot prevent
(a disk that truncates or flips bits, a file copied half-way) is caught on reading: a shard's size must match the
index, its header must parse, and with `verify` every row's bytes must match their sha256. Each failure is a
`CacheCorruptError` naming the shard file. Tensors are read with safetensors only.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from fusedit.cache.keys import CACHE_FORMAT, fingerprint_hash
from fusedit.errors import Refusal
from fusedit.io import read_safetensors_header, save_safetensors_atomic, write_json_atomic

log = logging.getLogger(__name__)

INDEX = "index.json"
ENCODER = "encoder.json"


class CacheCorruptError(Refusal, RuntimeError):
    """A cache shard or index that cannot be trusted; the message names the file and how to recover."""


def tensor_digest(tensors: list[torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# Tensors a row may hold besides target, edits and prompt: the loss mask reduced to target tokens [T] (a row with
# a mask), the empty prompt's encoding [L, D] (encoded when data.caption_dropout > 0) and, for Qwen-Image-2.1, the
# Qwen3-VL image slots of the prompt and of the empty prompt ([L] bool; fusedit.step.conditioning_qwen21).
EXTRAS = ("mask", "empty_prompt", "image_slots", "empty_image_slots")


def row_tensors(key: str, entry: Mapping) -> list[str]:
    """Tensor names of one row in its shard, in digest order: target, edit images, prompt, then its extras."""
    edits = (f"{key}/edit.{i}" for i in range(len(entry["edits"])))
    return [f"{key}/target", *edits, f"{key}/prompt", *(f"{key}/{name}" for name in entry.get("extras", []))]


def _ordered(row: Mapping) -> list[torch.Tensor]:
    return [row["target"], *row["edits"], row["prompt"], *(row[name] for name in EXTRAS if name in row)]


class LatentCache:
    """One fingerprint's shards and index under `root`. Readers use `entries` and `read`; writers `add`."""

    def __init__(self, root: str | Path, fingerprint: dict):
        self.fingerprint = fingerprint
        self.hash = fingerprint_hash(fingerprint)
        self.dir = Path(root) / self.hash[:16]
        self.index_path = self.dir / INDEX
        self.entries: dict[str, dict] = {}
        self.shards: dict[str, dict] = {}
        self._handles: dict[str, object] = {}
        self.reload()

    # -- index ------------------------------------------------------------------------------------------------
    def reload(self) -> None:
        self.entries, self.shards = {}, {}
        if not self.index_path.is_file():
            return
        try:
            index = json.loads(self.index_path.read_text(encoding="utf-8"))
            if index.get("format") != CACHE_FORMAT or index.get("fingerprint") != self.hash:
                raise ValueError(f"format {index.get('format')!r}, fingerprint {index.get('fingerprint')!r}")
            self.entries, self.shards = dict(index["rows"]), dict(index["shards"])
        except (ValueError, KeyError, TypeError) as error:
            raise CacheCorruptError(
                f"{self.index_path}: not a valid {CACHE_FORMAT} index for this cache directory ({error}). Delete "
                f"{self.dir} to encode everything again."
            ) from None
        # A shard deleted by hand (the remedy for a corrupt one) drops its rows: they are encoded again.
        gone = [name for name in self.shards if not (self.dir / name).is_file()]
        if gone:
            log.warning("cache %s: shard(s) %s are missing; their rows will be encoded again", self.dir, gone)
            for name in gone:
                del self.shards[name]
            self.entries = {key: entry for key, entry in self.entries.items() if entry["shard"] in self.shards}

    def _write_index(self) -> None:
        write_json_atomic(
            self.index_path,
            {"format": CACHE_FORMAT, "fingerprint": self.hash, "shards": self.shards, "rows": self.entries},
        )

    @contextlib.contextmanager
    def writer(self) -> Iterator[LatentCache]:
        """Exclusive write access (a file lock): concurrent builders (DDP ranks, two shells) serialise, and each
        sees what the previous one added."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self.reload()
                if not (self.dir / ENCODER).is_file():
                    write_json_atomic(self.dir / ENCODER, self.fingerprint)
                yield self
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def add(self, rows: list[tuple[str, dict[str, torch.Tensor], dict]]) -> str:
        """Write `rows` ([(key, {"target", "edits": [...], "prompt"}, info)]) as one new shard; index them.

        Call inside `writer()`. Returns the shard's file name.
        """
        number = 1 + max((int(name.split("-")[1].split(".")[0]) for name in self.shards), default=-1)
        name = f"shard-{number:06d}.safetensors"
        tensors, entries = {}, {}
        for key, row, info in rows:
            ordered = _ordered(row)
            entry = {
                "shard": name,
                "target": list(info["target_shape"]),
                "edits": [list(shape) for shape in info["edit_shapes"]],
                "prompt_len": int(row["prompt"].shape[0]),
                "row": int(info["row"]),
                "sha256": tensor_digest(ordered),
            }
            if any(name in row for name in EXTRAS):
                entry["extras"] = [name for name in EXTRAS if name in row]
            for tensor_name, tensor in zip(row_tensors(key, entry), ordered, strict=True):
                tensors[tensor_name] = tensor.detach().cpu().contiguous()
            entries[key] = entry
        path = self.dir / name
        save_safetensors_atomic(tensors, path, metadata={"format": CACHE_FORMAT, "fingerprint": self.hash})
        self.shards[name] = {"bytes": path.stat().st_size, "rows": len(entries)}
        self.entries.update(entries)
        self._write_index()
        return name

    # -- reading ----------------------------------------------------------------------------------------------
    def check_shards(self, names: set[str] | None = None) -> None:
        """Size and header of every shard in `names` (default: all); `CacheCorruptError` naming the first bad one."""
        for name in sorted(self.shards if names is None else names):
            path = self.dir / name
            expected = self.shards[name]["bytes"]
            actual = path.stat().st_size
            if actual != expected:
                raise CacheCorruptError(self._corrupt(path, f"{actual} bytes, the index recorded {expected}"))
            try:
                header, metadata = read_safetensors_header(path)
            except ValueError as error:
                raise CacheCorruptError(self._corrupt(path, str(error))) from None
            if metadata.get("fingerprint") != self.hash:
                raise CacheCorruptError(self._corrupt(path, "it belongs to another encoder fingerprint"))

    def _corrupt(self, path: Path, reason: str) -> str:
        rows = self.shards.get(path.name, {}).get("rows", "its")
        return (
            f"cache shard {path} is truncated or corrupt ({reason}). Delete it; its {rows} rows are encoded again "
            "by the next `fusedit cache` or training run with cache.build=true."
        )

    def _handle(self, name: str):
        handle = self._handles.get(name)
        if handle is None:
            path = self.dir / name
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except Exception as error:  # noqa: BLE001 - safetensors raises its own error types for bad files
                raise CacheCorruptError(self._corrupt(path, f"{type(error).__name__}: {error}")) from None
            self._handles[name] = handle
        return handle

    def read(self, key: str, verify: bool = True) -> dict:
        """{"target": [T, C], "edits": [[T_i, C]], "prompt": [L, D]} of row `key`, plus its `EXTRAS`."""
        entry = self.entries[key]
        path = self.dir / entry["shard"]
        handle = self._handle(entry["shard"])
        try:
            tensors = [handle.get_tensor(name) for name in row_tensors(key, entry)]
        except Exception as error:  # noqa: BLE001
            raise CacheCorruptError(self._corrupt(path, f"row {entry['row']} ({key[:12]}): {error}")) from None
        if verify and tensor_digest(tensors) != entry["sha256"]:
            raise CacheCorruptError(
                self._corrupt(path, f"the bytes of row {entry['row']} (key {key[:12]}) do not match their sha256")
            )
        extras = entry.get("extras", [])
        prompt_at = len(tensors) - len(extras) - 1
        row = {"target": tensors[0], "edits": tensors[1:prompt_at], "prompt": tensors[prompt_at]}
        return row | dict(zip(extras, tensors[prompt_at + 1 :], strict=True))

    def __getstate__(self) -> dict:
        # DataLoader workers get a copy without open file handles; each opens its own.
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def close(self) -> None:
        self._handles.clear()


def shard_bytes_of(rows: list[tuple[str, dict[str, torch.Tensor], dict]]) -> int:
    return sum(t.numel() * t.element_size() for _, row, _ in rows for t in _ordered(row))


__all__ = ["CacheCorruptError", "LatentCache"]
