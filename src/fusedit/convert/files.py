"""Converting checkpoint files: single safetensors files, sharded transformer folders, pipelines, and LoRAs.

Model weights stream: the output is written tensor by tensor in safetensors format (header first, computed from the
input headers and the conversion plan), reading each input tensor only when an output tensor needs it. q, k and v
of one block may sit in different shards; they are read from wherever they are. Input files are opened
(memory-mapped) per output shard and closed after it, so the resident memory stays around one or two shards
whatever the checkpoint size. Every file is written to a temporary name and renamed when complete.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open

from fusedit.errors import OutputExistsError, UserFileNotFoundError, UserInputError
from fusedit.io import (
    atomic_write_path,
    current_umask,
    fsync_dir,
    read_safetensors_header,
    save_safetensors_atomic,
    write_json_atomic,
)
from fusedit.model.weight_files import read_json, transformer_weight_files

from .layout import (
    DIRECTION_TO,
    DIRECTIONS,
    LAYOUTS,
    TARGET_LAYOUT,
    TO_STANDARD,
    TensorPlan,
    model_layout,
    plan_model_conversion,
)
from .lora_formats import FORMATS, STANDARD_ONLY_FORMATS, LoraWeights, classify_keys, lora_to_state_dict, read_lora
from .lora_qkv import convert_lora_layout

log = logging.getLogger(__name__)

DTYPE_TO_ST = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
ST_SIZES = {name: dtype.itemsize for dtype, name in DTYPE_TO_ST.items()}
# Bytes read through one memory map before it is dropped, so mapped pages do not pile up in a big single file.
REMAP_BYTES = 1 << 30


def _nbytes(dtype: str, shape: Sequence[int]) -> int:
    if dtype not in ST_SIZES:
        raise UserInputError(f"unsupported safetensors dtype {dtype}")
    return math.prod(shape) * ST_SIZES[dtype]


def write_safetensors_streaming(path: Path, plan: Sequence[TensorPlan], get, metadata: Mapping[str, str]) -> int:
    """Write the tensors `plan` describes (dtype as safetensors strings) to `path`, building each on demand.

    Returns the number of data bytes. Only the tensor being written (and its sources) is in memory.
    """
    header: dict = {}
    offset = 0
    for entry in plan:
        size = _nbytes(entry.dtype, entry.shape)
        header[entry.name] = {"dtype": entry.dtype, "shape": list(entry.shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = dict(metadata)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors itself writes it
    with atomic_write_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(len(raw).to_bytes(8, "little"))
        handle.write(raw)
        for entry in plan:
            tensor = entry.build(get)
            if DTYPE_TO_ST.get(tensor.dtype) != entry.dtype or tuple(tensor.shape) != entry.shape:
                raise ValueError(
                    f"{path}: {entry.name} came out {tensor.dtype} {list(tensor.shape)}, expected "
                    f"{entry.dtype} {list(entry.shape)}"
                )
            handle.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del tensor
    return offset


def _release_freed_memory() -> None:
    # glibc keeps freed multi-MB tensor buffers in its heap (its mmap threshold adapts upwards), so without a trim
    # the resident size ratchets up shard after shard although nothing is alive. No-op off glibc.
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


class _TensorSource:
    """Tensors by key from a set of safetensors files, each memory-mapped only while in use."""

    def __init__(self, files_by_key: Mapping[str, Path]):
        self.files_by_key = files_by_key
        self._open: dict[Path, contextlib.ExitStack] = {}
        self._handles: dict = {}
        self._bytes_read = 0

    def get(self, key: str) -> torch.Tensor:
        path = self.files_by_key[key]
        if path not in self._handles:
            stack = contextlib.ExitStack()
            self._handles[path] = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            self._open[path] = stack
        tensor = self._handles[path].get_tensor(key)
        self._bytes_read += tensor.numel() * tensor.element_size()
        if self._bytes_read > REMAP_BYTES:
            self.close()
        return tensor

    def close(self) -> None:
        for stack in self._open.values():
            stack.close()
        self._open.clear()
        self._handles.clear()
        self._bytes_read = 0
        _release_freed_memory()


def _copy_atomic(src: Path, dst: Path) -> None:
    with atomic_write_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def _ordered_specs(path: Path) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str]]:
    header, metadata = read_safetensors_header(path)
    keys = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    return {k: (header[k]["dtype"], tuple(header[k]["shape"])) for k in keys}, metadata


def _convert_model_shards(targets: Mapping[Path, Path], direction: str, what: str) -> dict:
    """Convert model shards {input file: output file}; q/k/v may span shards (the q's shard gets the merged one)."""
    shards = list(targets)
    specs: dict[str, tuple[str, tuple[int, ...]]] = {}
    shard_of: dict[str, Path] = {}
    shard_meta: dict[Path, dict[str, str]] = {}
    for shard in shards:
        shard_specs, shard_meta[shard] = _ordered_specs(shard)
        duplicate = sorted(set(shard_specs) & set(specs))
        if duplicate:
            raise UserInputError(f"{what}: tensors present in more than one shard: {', '.join(duplicate[:5])}")
        specs.update(shard_specs)
        shard_of.update(dict.fromkeys(shard_specs, shard))
    kind = classify_keys(specs, what)
    if kind != "model":
        raise UserInputError(f"{what}: holds LoRA weights, not a model")
    layout = model_layout(specs, what)
    if layout is None:
        raise UserInputError(f"{what}: no Qwen-Image attention projections (…attn.to_q / …attn.to_qkv) among its keys")
    noop = layout == TARGET_LAYOUT[direction]
    plan = plan_model_conversion(specs, direction, what)
    source = _TensorSource(shard_of)
    written: dict[str, list[str]] = {}
    try:
        for shard in shards:
            entries = [entry for entry in plan if shard_of[entry.sources[0]] == shard]
            if noop:
                _copy_atomic(shard, targets[shard])
            else:
                write_safetensors_streaming(targets[shard], entries, source.get, shard_meta[shard])
                source.close()
            written[targets[shard].name] = [entry.name for entry in entries]
    finally:
        source.close()
    return {
        "input_layout": layout,
        "output_layout": TARGET_LAYOUT[direction],
        "noop": noop,
        "written": written,
        "total_size": sum(_nbytes(e.dtype, e.shape) for e in plan),
    }


def _convert_transformer_dir(src: Path, dst: Path, direction: str) -> dict:
    weights = transformer_weight_files(src)
    shards, index_path = weights.files, weights.index
    dst.mkdir(parents=True, exist_ok=True)
    report = _convert_model_shards({shard: dst / shard.name for shard in shards}, direction, str(src))
    if index_path is not None:
        old = read_json(index_path)
        weight_map = {key: name for name, keys in report["written"].items() for key in keys}
        meta = dict(old.get("metadata") or {})
        meta["total_size"] = report["total_size"]
        write_json_atomic(dst / index_path.name, {"metadata": meta, "weight_map": dict(sorted(weight_map.items()))})
    weight_files = {p.name for p in shards} | ({index_path.name} if index_path else set())
    for item in sorted(src.iterdir()):  # config.json and anything else that is not a weight file
        if item.is_file() and item.name not in weight_files:
            _copy_atomic(item, dst / item.name)
    return report


def _copy_tree_atomic(src: Path, dst: Path) -> None:
    for item in sorted(src.rglob("*")):
        if item.is_file():
            _copy_atomic(item, dst / item.relative_to(src))


def _check_output(output: Path, input: Path, overwrite: bool) -> None:
    out, src = output.resolve(), input.resolve()
    if out == src:
        raise UserInputError(f"output {output} is the input; write the conversion somewhere else")
    if out.is_relative_to(src):
        raise UserInputError(f"output {output} is inside the input {input}; write the conversion somewhere else")
    if src.is_relative_to(out):
        raise UserInputError(f"output {output} holds the input {input}; write the conversion somewhere else")
    if output.exists() and not overwrite and not (output.is_dir() and not any(output.iterdir())):
        raise OutputExistsError(output, "the output exists")
    model_markers = ("config.json", "model_index.json")
    if (
        overwrite
        and output.is_dir()
        and any(output.iterdir())
        and not any((output / m).is_file() for m in model_markers)
    ):
        # --overwrite replaces a folder whole: never a folder that is not a converted model (a typo like --output .).
        raise UserInputError(
            f"output {output} is a folder without config.json or model_index.json; --overwrite replaces a model "
            "folder as a whole and will not delete this one"
        )


@contextlib.contextmanager
def _replaced_whole(output: Path) -> Iterator[Path]:
    """Yield a staging folder beside `output`; on success it replaces `output` (folder or file) as a whole.

    A converted folder never keeps files of what it replaces (an old shard index beside a new single file would be
    followed by every loader, silently giving the old model), and a failed conversion leaves the old output as it
    was: the new tree is renamed into place only once complete, the old one removed only after that.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp's 0700 would hide the model from the rest of a cluster
    try:
        yield staging
        if output.exists() or output.is_symlink():
            retired = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".old", dir=output.parent))
            os.replace(output, retired / output.name)
            os.replace(staging, output)
            shutil.rmtree(retired)
        else:
            os.replace(staging, output)
        fsync_dir(output.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def convert_checkpoint(
    input: str | os.PathLike,
    output: str | os.PathLike,
    direction: str | None = None,
    format: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Convert a checkpoint on disk; returns a small report dict.

    input: a single .safetensors file (model weights or a LoRA), a transformer folder (config.json plus one
    safetensors file or shards with a `*.safetensors.index.json`), a pipeline folder (model_index.json; its
    transformer/ is converted, every other component is copied), or a PEFT LoRA folder (adapter_config.json).
    direction: "to_merged" | "to_standard"; may be omitted for a LoRA whose format alone changes.
    format: LoRA output format (diffusers, peft, diffsynth, comfyui, kohya); default: the input's format.
    """
    src, dst = Path(input), Path(output)
    if not src.exists():
        raise UserFileNotFoundError(f"input {src} does not exist")
    if direction is not None and direction not in DIRECTIONS:
        raise UserInputError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if format is not None and format not in FORMATS:
        raise UserInputError(f"format must be one of {FORMATS}, got {format!r}")
    _check_output(dst, src, overwrite)
    if _is_lora_checkpoint(src):
        return _convert_lora_checkpoint(src, dst, direction, format)
    if format is not None:
        raise UserInputError("--format applies to LoRAs only; this input holds model weights")
    if direction is None:
        raise UserInputError("converting model weights needs a direction (to_merged or to_standard)")
    return _convert_model_checkpoint(src, dst, direction)


def _is_lora_checkpoint(src: Path) -> bool:
    """A PEFT folder (adapter_config.json) or a single safetensors file whose keys are a LoRA's."""
    if src.is_dir():
        return (src / "adapter_config.json").is_file()
    return src.is_file() and classify_keys(read_safetensors_header(src)[0], str(src)) == "lora"


def _convert_lora_checkpoint(src: Path, dst: Path, direction: str | None, format: str | None) -> dict:
    """A LoRA to one safetensors file in `format` (default: its own) and `direction`'s layout (default: its own)."""
    if dst.suffix != ".safetensors":
        raise UserInputError(f"output {dst}: a LoRA is written to one .safetensors file")
    lora = read_lora(src)
    layout_in, format_in = lora.layout, lora.format
    out_format = format or lora.format
    if direction is None and out_format in STANDARD_ONLY_FORMATS:
        direction = TO_STANDARD  # its readers know only q/k/v names; the split is exact
    if direction is not None:
        lora = convert_lora_layout(lora, direction)
    write_lora(lora, dst, out_format, TARGET_LAYOUT[direction] if direction is not None else None)
    return {
        "kind": "lora",
        "input_format": format_in,
        "output_format": out_format,
        "input_layout": layout_in,
        "output_layout": lora.layout,
        # A format change alone is a real conversion; "noop" means the output equals the input.
        "noop": out_format == format_in and (direction is None or layout_in in (None, TARGET_LAYOUT[direction])),
        "output": str(dst),
    }


def _convert_model_checkpoint(src: Path, dst: Path, direction: str) -> dict:
    """Model weights (a single file, a transformer folder or a pipeline folder) to `direction`'s layout."""
    if src.is_file():
        if dst.suffix != ".safetensors":
            raise UserInputError(f"output {dst}: a single-file checkpoint is written to a .safetensors file")
        report = _convert_model_shards({src: dst}, direction, str(src))
        return {"kind": "model_file", **_public(report), "output": str(dst)}
    if (src / "model_index.json").is_file():
        if not (src / "transformer").is_dir():
            raise UserInputError(f"{src}: pipeline folder without a transformer/ subfolder")
        with _replaced_whole(dst) as staging:
            report = _convert_transformer_dir(src / "transformer", staging / "transformer", direction)
            _copy_other_components(src, staging)
        return {"kind": "pipeline", **_public(report), "output": str(dst)}
    if (src / "config.json").is_file():
        with _replaced_whole(dst) as staging:
            report = _convert_transformer_dir(src, staging, direction)
        return {"kind": "transformer", **_public(report), "output": str(dst)}
    raise UserInputError(
        f"{src}: not a checkpoint fusedit can convert (expected a .safetensors file, a transformer folder with "
        "config.json, a pipeline folder with model_index.json, or a PEFT LoRA folder with adapter_config.json)"
    )


def _copy_other_components(pipeline: Path, staging: Path) -> None:
    """Every item of a pipeline folder but transformer/ (text encoder, VAE, scheduler, ...), copied unchanged."""
    for item in sorted(pipeline.iterdir()):
        if item.name == "transformer":
            continue
        if item.is_dir():
            _copy_tree_atomic(item, staging / item.name)
        else:
            _copy_atomic(item, staging / item.name)


def _public(report: dict) -> dict:
    return {k: report[k] for k in ("input_layout", "output_layout", "noop")} | {"files": sorted(report["written"])}


def write_lora(
    lora: LoraWeights, path: str | os.PathLike, format: str = "diffusers", layout: str | None = None
) -> Path:
    """Write `lora` to one safetensors file, atomically, in `format` and (optionally converted to) `layout`.

    `STANDARD_ONLY_FORMATS` are always written in the standard layout (a merged LoRA is split exactly); asking
    for them in the merged layout raises ValueError.
    """
    if layout is not None and layout not in LAYOUTS:
        raise UserInputError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if format in STANDARD_ONLY_FORMATS:
        layout = layout or "standard"  # "merged_qkv" is refused by lora_to_state_dict
    if layout is not None and layout != lora.layout and lora.layout is not None:
        lora = convert_lora_layout(lora, DIRECTION_TO[layout])
    tensors, metadata = lora_to_state_dict(lora, format)
    save_safetensors_atomic(tensors, path, metadata)
    return Path(path)
