"""Load a Qwen-Image (or Qwen-Image-2.1) transformer in the layout the caller wants, whatever layout the checkpoint
is in.

Accepted checkpoints: a diffusers pipeline directory (model_index.json + transformer/), a transformer directory
(config.json + one or several safetensors shards with their index), or a single safetensors file (the config is
then read from the tensor shapes). Standard checkpoints go through diffusers' `from_pretrained`, the path real
20B weights take; merged checkpoints are built on the meta device and filled straight from safetensors.
The model class comes from the transformer config's `_class_name` (a single file: from its keys, 2.1's SwiGLU).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import QwenImage21Transformer2DModel, QwenImageTransformer2DModel
from safetensors import safe_open

from fusedit.convert.layout import LAYOUTS, model_layout
from fusedit.convert.single_file import (
    DEQUANTIZED_DEFAULT,
    MARKER_2511,
    dequantize_scaled_fp8,
    has_2511_marker,
    is_marker,
    is_scaled_fp8,
)
from fusedit.errors import UserFileNotFoundError, UserInputError
from fusedit.io import read_safetensors_header
from fusedit.model.merged_qkv import fuse_qkv, unfuse_qkv
from fusedit.model.module_map import QWEN21_TRANSFORMER_CLASS, block_index
from fusedit.model.weight_files import transformer_weight_files

SINGLE_FILE_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def resolve_transformer_dir(path: str | Path) -> Path:
    """The transformer directory of a pipeline dir, or the path itself when it is a transformer dir or a file."""
    path = Path(path)
    if not path.exists():
        raise UserFileNotFoundError(f"model path {path} does not exist")
    if path.is_dir() and (path / "model_index.json").is_file():
        transformer = path / "transformer"
        if not transformer.is_dir():
            raise UserFileNotFoundError(f"{path} is a pipeline directory without a transformer/ subfolder")
        return transformer
    return path


def checkpoint_keys(files: list[Path]) -> list[str]:
    """Every tensor name of the checkpoint's weight `files`, read from headers only."""
    keys: list[str] = []
    for file in files:
        header, _ = read_safetensors_header(file)
        keys.extend(header)
    return keys


def checkpoint_layout(keys: list[str], what: str = "checkpoint") -> str:
    layout = model_layout(keys, what)  # raises on a mix of layouts, naming the keys
    if layout is None:
        raise UserInputError(f"{what} has no Qwen-Image attention projections (no attn.to_q / attn.to_qkv keys)")
    return layout


def _strip_prefix(key: str) -> str:
    for prefix in SINGLE_FILE_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def config_from_header(header: dict[str, dict]) -> dict:
    """Reconstruct a QwenImageTransformer2DModel config from tensor shapes (single-file checkpoints carry none).

    Head size is not visible in the shapes; Qwen-Image uses 128 throughout, tiny test models record theirs in
    the file's metadata (`attention_head_dim`). `zero_cond_t` (Edit-2511) is not visible either: pass it explicitly.
    """
    shapes = {_strip_prefix(key): value["shape"] for key, value in header.items()}
    try:
        inner_dim, in_channels = shapes["img_in.weight"]
        _, joint_attention_dim = shapes["txt_in.weight"]
        proj_out_features = shapes["proj_out.weight"][0]
    except KeyError as error:
        raise UserInputError(f"not a Qwen-Image transformer checkpoint: missing tensor {error}") from None
    num_layers = 1 + max(index for key in shapes if (index := block_index(key)) is not None)
    return {
        "in_channels": in_channels,
        "out_channels": proj_out_features // 4,
        "num_layers": num_layers,
        "joint_attention_dim": joint_attention_dim,
        "inner_dim": inner_dim,
    }


def _model_class(config: dict) -> type:
    return (
        QwenImage21Transformer2DModel
        if config.get("_class_name") == QWEN21_TRANSFORMER_CLASS
        else QwenImageTransformer2DModel
    )


def qwen21_config_from_header(header: dict[str, dict], metadata: dict[str, str]) -> dict | None:
    """A QwenImage21Transformer2DModel config from tensor shapes, or None when the keys are not 2.1's.

    Head size is `attn.norm_q.weight`'s length; the RoPE axes are not visible in shapes: they come from the file's
    `config` metadata when present, else diffusers' defaults (the released model's).
    """
    shapes = {_strip_prefix(key): value["shape"] for key, value in header.items()}
    mlp = shapes.get("transformer_blocks.0.img_mlp.gate_layer.weight")
    if mlp is None and "transformer_blocks.0.img_mlp.gate_up_proj.weight" in shapes:
        rows, columns = shapes["transformer_blocks.0.img_mlp.gate_up_proj.weight"]
        mlp = [rows // 2, columns]
    if mlp is None:
        return None
    try:
        inner_dim, in_channels = shapes["img_in.weight"]
        context_in_dim = shapes["txt_in.in_layer.weight"][1]
        head_dim = shapes["transformer_blocks.0.attn.norm_q.weight"][0]
        out_channels = shapes["proj_out.weight"][0]
    except KeyError as error:
        raise UserInputError(f"not a Qwen-Image-2.1 transformer checkpoint: missing tensor {error}") from None
    config = json.loads(metadata["config"]) if "config" in metadata else {}
    config.update(
        _class_name=QWEN21_TRANSFORMER_CLASS,
        in_channels=in_channels,
        out_channels=out_channels,
        num_layers=1 + max(index for key in shapes if (index := block_index(key)) is not None),
        attention_head_dim=head_dim,
        num_attention_heads=inner_dim // head_dim,
        context_in_dim=context_in_dim,
        mlp_ratio=mlp[0] // inner_dim,
    )
    return config


def _single_file_config(file: Path, zero_cond_t: bool | None) -> dict:
    header, metadata = read_safetensors_header(file)
    qwen21 = qwen21_config_from_header(header, metadata)
    if qwen21 is not None:
        return qwen21
    shapes = config_from_header(header)
    head_dim = int(metadata.get("attention_head_dim", 128))
    if shapes["inner_dim"] % head_dim:
        raise UserInputError(f"{file}: hidden size {shapes['inner_dim']} is not a multiple of the head size {head_dim}")
    marked_2511 = has_2511_marker(header)
    if marked_2511 and zero_cond_t is False:
        raise UserInputError(
            f"{file} is a Qwen-Image-Edit-2511 transformer (it carries the {MARKER_2511} marker), but the pipeline it "
            "is loaded into is not Edit-2511; use it with the Qwen-Image-Edit-2511 pipeline"
        )
    config = json.loads(metadata["config"]) if "config" in metadata else {}
    config.update({key: value for key, value in shapes.items() if key != "inner_dim"})
    config.setdefault("attention_head_dim", head_dim)
    config.setdefault("num_attention_heads", shapes["inner_dim"] // head_dim)
    config.setdefault("zero_cond_t", marked_2511 if zero_cond_t is None else zero_cond_t)
    return config


def _load_by_assignment(config: dict, files: list[Path], merged: bool, dtype: torch.dtype | None) -> torch.nn.Module:
    with init_empty_weights():
        model = _model_class(config).from_config(config)
    if merged:
        fuse_qkv(model)
    state_dict: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                state_dict[_strip_prefix(key)] = handle.get_tensor(key)
    if is_scaled_fp8(state_dict):
        # The float8 weights are stored divided by their scales: restore them (convert.single_file).
        dtype = dtype or getattr(torch, DEQUANTIZED_DEFAULT)
        state_dict = dequantize_scaled_fp8(state_dict, dtype)
    else:
        state_dict = {key: tensor for key, tensor in state_dict.items() if not is_marker(key)}
    if dtype is not None:
        state_dict = {key: tensor.to(dtype) for key, tensor in state_dict.items()}
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    if missing or unexpected:
        raise UserInputError(
            f"checkpoint {files[0].parent} does not match the model: missing {sorted(missing)[:8]}, "
            f"unexpected {sorted(unexpected)[:8]}"
        )
    return model.eval()


def load_transformer(
    path: str | Path,
    layout: str = "merged_qkv",
    dtype: torch.dtype | None = None,
    zero_cond_t: bool | None = None,
) -> QwenImageTransformer2DModel | QwenImage21Transformer2DModel:
    """Load the transformer at `path` (pipeline dir, transformer dir or safetensors file) in `layout`.

    Qwen-Image-2.1 transformers load as `QwenImage21Transformer2DModel` ("merged_qkv" there also merges the
    SwiGLU's gate/up, fusedit.model.merged_qwen21).

    `zero_cond_t` matters for a single file only (a folder's config.json says it): True or False is what the
    pipeline the file goes into needs, None takes it from the file (ComfyUI's Edit-2511 marker,
    `fusedit.convert.single_file`). A file with the 2511 marker and `zero_cond_t=False` is refused (ValueError).
    "fp8 scaled" single files are dequantized (weight * scale_weight) to `dtype`, bfloat16 when None.
    """
    if layout not in LAYOUTS:
        raise UserInputError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    transformer_path = resolve_transformer_dir(path)
    files = list(transformer_weight_files(transformer_path).files)
    stored = checkpoint_layout(checkpoint_keys(files), str(transformer_path))

    if transformer_path.is_file():
        config = _single_file_config(transformer_path, zero_cond_t)
        model = _load_by_assignment(config, files, merged=stored == "merged_qkv", dtype=dtype)
    else:
        config = QwenImageTransformer2DModel.load_config(transformer_path)
        if stored == "standard":
            model = _model_class(config).from_pretrained(transformer_path, dtype=dtype)
        else:
            model = _load_by_assignment(config, files, merged=True, dtype=dtype)

    return fuse_qkv(model) if layout == "merged_qkv" else unfuse_qkv(model)
