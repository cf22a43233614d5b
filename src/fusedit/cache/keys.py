"""What a cached row depends on, as hashes.

A row's key is sha256 over the encoder fingerprint, the prompt text and the bytes of the target and edit image
files, so a changed image or prompt gets a new key (and is encoded again) while an unchanged one keeps its key
(and is never encoded again). The fingerprint covers everything else the encodings depend on:

- the fusedit cache format version (bumped whenever the preprocessing or the stored layout changes),
- the pipeline class (Edit vs Edit-2509/2511: template, VLM image size, multi-image),
- its prompt template, template drop index and the VLM image areas (read from diffusers' pipeline class),
- the diffusers version (the encoding code is diffusers' own `encode_prompt` / `_encode_vae_image`),
- the VAE, text encoder, tokenizer and processor: the sha256 of every config/tokenizer file, and name, size and
  mtime of every weight file (hashing 16 GB of text encoder at every start would cost more than it protects),
- the encoder dtype and the resize settings (`data.max_pixels`, `data.edit_max_pixels`).

Changing any of these changes the fingerprint, which selects another cache directory: nothing encoded under the
old settings is ever read under the new ones.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import diffusers

CACHE_FORMAT = "fusedit.cache/1"
ENCODER_COMPONENTS = ("vae", "text_encoder", "tokenizer", "processor")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_CHUNK = 1 << 20


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _component_files(root: Path, component: str) -> dict[str, str]:
    folder = root / component
    if not folder.is_dir():
        return {}
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(root).as_posix()
        if path.name.endswith(WEIGHT_SUFFIXES):
            stat = path.stat()
            files[name] = f"size={stat.st_size} mtime_ns={stat.st_mtime_ns}"
        else:
            files[name] = "sha256=" + file_sha256(path)
    return files


def _template(pipeline_class: str) -> dict:
    """The prompt template and VLM image sizes of `pipeline_class`, from diffusers itself (no weights loaded)."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus

    from fusedit.training.conditioning import EDIT_VLM_AREA

    cls = getattr(diffusers, pipeline_class, None)
    if cls is None:
        raise ValueError(f"model_index.json names pipeline class {pipeline_class!r}, which diffusers does not have")
    # The template is set in __init__; every component may be None (the pipeline only reads configs when present).
    empty = cls(scheduler=None, vae=None, text_encoder=None, tokenizer=None, processor=None, transformer=None)
    return {
        "prompt_template_encode": empty.prompt_template_encode,
        "prompt_template_encode_start_idx": empty.prompt_template_encode_start_idx,
        "tokenizer_max_length": empty.tokenizer_max_length,
        "edit_vlm_area": EDIT_VLM_AREA,
        "plus_condition_image_size": pipeline_qwenimage_edit_plus.CONDITION_IMAGE_SIZE,
        "vae_image_size": getattr(pipeline_qwenimage_edit_plus, "VAE_IMAGE_SIZE", None),
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


def row_key(fingerprint: str, prompt: str, image_sha256: str, edit_sha256: list[str] | tuple[str, ...]) -> str:
    """The cache key of one dataset row. Lengths are hashed in, so no two field splits give the same stream."""
    digest = hashlib.sha256()
    for part in (fingerprint, prompt, image_sha256, *edit_sha256):
        data = part.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    digest.update(len(edit_sha256).to_bytes(8, "little"))
    return digest.hexdigest()
