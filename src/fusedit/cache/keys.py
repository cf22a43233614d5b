"""What a cached row depends on, as hashes.

A row's key is sha256 over the encoder fingerprint, the prompt text and the bytes of the target and edit image
files, so a changed image or prompt gets a new key (and is encoded again) while an unchanged one keeps its key
(and is never encoded again). The fingerprint covers everything else the encodings depend on:

- the fusedit cache format version (bumped whenever the preprocessing or the stored layout changes),
- the pipeline class (Edit vs Edit-2509/2511: template, VLM image size, multi-image; Qwen-Image-2.1),
- its prompt template, template drop index and the VLM image areas (read from diffusers' pipeline class; for 2.1
  the system prompt and image template of diffusers' 2.1 encoder and the stored row layout),
- the diffusers version (the encoding code is diffusers' own `encode_prompt` / `_encode_vae_image`),
- the files of the VAE, text encoder, tokenizer and processor, by content (`content_digest`, below),
- the encoder dtype and the resize settings (`data.max_pixels`, `data.edit_max_pixels`).

Changing any of these changes the fingerprint, which selects another cache directory: nothing encoded under the
old settings is ever read under the new ones.

Files are identified by their bytes, never by name, size or mtime, so a copied, moved or re-downloaded model
finds its cache. Hashing all of them would cost a full read of the 16 GB text encoder at every start (measured:
6.3 s per 4 GB shard from the page cache, 9.7 s from disk, so 25-40 s; minutes from network storage), so only
small files are hashed whole:

- a file of at most `FULL_HASH_BYTES` (256 MiB: every config, tokenizer and processor file, and the bf16 VAE of
  Qwen-Image-Edit) is hashed whole: any change to it is detected;
- a larger safetensors file is identified by its size, its header (every tensor's name, dtype, shape and byte
  offsets, and the metadata) and `SAMPLE_BYTES` (4 KiB) at each end of every tensor plus `SPREAD_SAMPLES` (64)
  blocks of that size spread evenly over the file. Another checkpoint (retrained, fine-tuned, converted, another
  precision) differs in every tensor, so its first bytes differ; a change of any tensor's name, dtype or shape
  changes the header. One 8 KiB read per tensor boundary: a Qwen2.5-VL-7B text encoder (about 730 tensors in
  4-5 shards) costs about 1,000 reads, whatever its size (a generated 4.1 GB shard: 30 ms from disk);
- any other large file (.bin, .gguf, ...) by its size, its first and last MiB (a torch zip keeps a CRC-32 of
  every tensor at its end) and the spread blocks.

What this gives up: a weight edited in place inside a large tensor, away from the sampled blocks, keeps the
fingerprint. Nobody edits single weights of an encoder in place; whoever does must delete the cache directory.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from pathlib import Path

import diffusers

CACHE_FORMAT = "fusedit.cache/1"
ENCODER_COMPONENTS = ("vae", "text_encoder", "tokenizer", "processor")
FULL_HASH_BYTES = 256 << 20
SAMPLE_BYTES = 4 << 10
SPREAD_SAMPLES = 64
EDGE_BYTES = 1 << 20  # of a large file that is not safetensors
_CHUNK = 1 << 20


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _safetensors_layout(fd: int, size: int) -> tuple[bytes, list[int]] | None:
    """(raw header, absolute start and end offset of every tensor) or None when this is not a safetensors file."""
    raw_len = os.pread(fd, 8, 0)
    if len(raw_len) != 8:
        return None
    header_len = int.from_bytes(raw_len, "little")
    if not 0 < header_len <= min(100 << 20, size - 8):
        return None
    raw = os.pread(fd, header_len, 8)
    try:
        header = json.loads(raw)
        ends = [
            8 + header_len + int(offset)
            for name, info in header.items()
            if name != "__metadata__"
            for offset in info["data_offsets"]
        ]
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    return raw, ends


def sampled_ranges(path: str | Path) -> tuple[str, list[tuple[int, int]], bytes]:
    """(kind, merged [start, end) byte ranges `content_digest` reads, safetensors header) of a large file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return _ranges(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _ranges(fd: int, size: int) -> tuple[str, list[tuple[int, int]], bytes]:
    layout = _safetensors_layout(fd, size)
    if layout is not None:
        header, boundaries = layout
        kind = "safetensors"
        wanted = [(b - SAMPLE_BYTES, b + SAMPLE_BYTES) for b in boundaries]
        data_start = 8 + len(header)
    else:
        header, kind, data_start = b"", "sampled", 0
        wanted = [(0, EDGE_BYTES), (size - EDGE_BYTES, size)]
    step = max(1, (size - data_start) // SPREAD_SAMPLES)
    wanted += [(data_start + i * step, data_start + i * step + SAMPLE_BYTES) for i in range(SPREAD_SAMPLES)]
    merged: list[tuple[int, int]] = []
    for start, end in sorted((max(data_start, a), min(size, b)) for a, b in wanted):
        if start >= end:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return kind, merged, header


def content_digest(path: str | Path) -> str:
    """A digest of `path`'s bytes that does not depend on its name or mtime: sha256 of the whole file up to
    `FULL_HASH_BYTES`, of its size, header and sampled blocks beyond (see the module docstring)."""
    size = os.path.getsize(path)
    if size <= FULL_HASH_BYTES:
        return "sha256=" + file_sha256(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        kind, ranges, header = _ranges(fd, size)
        digest = hashlib.sha256(size.to_bytes(8, "little") + len(header).to_bytes(8, "little") + header)
        for start, end in ranges:
            block = os.pread(fd, end - start, start)
            if len(block) != end - start:
                raise OSError(f"{path} shrank while it was being read")
            digest.update(start.to_bytes(8, "little"))
            digest.update(block)
    finally:
        os.close(fd)
    return f"{kind}-sampled-sha256={digest.hexdigest()}"


def _component_files(root: Path, component: str) -> dict[str, str]:
    folder = root / component
    if not folder.is_dir():
        return {}
    # Hidden files (.DS_Store, download bookkeeping with timestamps) are never loaded by diffusers.
    files = sorted(
        path
        for path in folder.rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )
    return {path.relative_to(root).as_posix(): content_digest(path) for path in files}


def _template(pipeline_class: str) -> dict:
    """The prompt template and VLM image sizes of `pipeline_class`, from diffusers itself (no weights loaded)."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus

    from fusedit.families import QWEN21_PIPELINE_PREFIX
    from fusedit.step.conditioning import EDIT_VLM_AREA

    if pipeline_class.startswith(QWEN21_PIPELINE_PREFIX):
        return _qwen21_template()
    cls = getattr(diffusers, pipeline_class, None)
    if cls is None:
        raise ValueError(f"model_index.json names pipeline class {pipeline_class!r}, which diffusers does not have")
    # The template is set in __init__; every component may be None (the pipeline only reads configs when present).
    # QwenImagePipeline (text-to-image) shows the VLM no image and takes no processor.
    components = ("scheduler", "vae", "text_encoder", "tokenizer", "processor", "transformer")
    accepted = inspect.signature(cls.__init__).parameters
    empty = cls(**{name: None for name in components if name in accepted})
    return {
        "prompt_template_encode": empty.prompt_template_encode,
        "prompt_template_encode_start_idx": empty.prompt_template_encode_start_idx,
        "tokenizer_max_length": empty.tokenizer_max_length,
        "edit_vlm_area": EDIT_VLM_AREA,
        "plus_condition_image_size": pipeline_qwenimage_edit_plus.CONDITION_IMAGE_SIZE,
        "vae_image_size": getattr(pipeline_qwenimage_edit_plus, "VAE_IMAGE_SIZE", None),
    }


def _qwen21_template() -> dict:
    """Qwen-Image-2.1's prompt template pieces (diffusers' `get_qwenimage21_prompt_embeds` builds the prompt from
    them) and the stored row layout: references first, target last, the Qwen3-VL image slots beside the prompt."""
    from diffusers.modular_pipelines.qwenimage21 import encoders

    return {
        "system_prompt": encoders.QWENIMAGE21_SYSTEM_PROMPT,
        "image_template": encoders.QWENIMAGE21_IMAGE_TEMPLATE,
        "layout": "qwen-image-2.1: references first, target last, image_slots",
    }


def encoder_fingerprint(model_path: str | Path, dtype: str, max_pixels: int, edit_max_pixels: int | None) -> dict:
    """Everything besides the row's own inputs that its cached encodings depend on (see the module docstring)."""
    root = Path(model_path)
    index_file = root / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(
            f"model.path {root} is not a diffusers pipeline directory (no model_index.json); the cache is made "
            "with the pipeline's VAE and text encoder"
        )
    try:
        pipeline_class = json.loads(index_file.read_text())["_class_name"]
    except (json.JSONDecodeError, KeyError) as error:
        raise ValueError(f"{index_file}: cannot read the pipeline class ({error})") from None
    return {
        "format": CACHE_FORMAT,
        "pipeline_class": pipeline_class,
        "template": _template(pipeline_class),
        "diffusers": diffusers.__version__,
        "files": {component: _component_files(root, component) for component in ENCODER_COMPONENTS},
        "dtype": str(dtype),
        "max_pixels": int(max_pixels),
        "edit_max_pixels": None if edit_max_pixels is None else int(edit_max_pixels),
    }


def fingerprint_hash(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


def row_key(
    fingerprint: str,
    prompt: str,
    image_sha256: str,
    edit_sha256: list[str] | tuple[str, ...],
    mask_sha256: str | None = None,
) -> str:
    """The cache key of one dataset row. Lengths are hashed in, so no two field splits give the same stream; a row
    without a mask keeps the key it had before masks existed."""
    digest = hashlib.sha256()
    for part in (fingerprint, prompt, image_sha256, *edit_sha256):
        data = part.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    digest.update(len(edit_sha256).to_bytes(8, "little"))
    if mask_sha256 is not None:
        digest.update(b"mask" + mask_sha256.encode("ascii"))
    return digest.hexdigest()
