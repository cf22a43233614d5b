"""What is at a path: a Qwen-Image pipeline, transformer, single model file, or LoRA — from headers and configs.

Only safetensors headers (names, shapes, dtypes) and JSON configs are read for models; no model weight tensor is
loaded and torch is not imported (dtypes stay safetensors' names, e.g. "BF16"), so `fusedit detect` answers in under
a second. A LoRA file is small and is read whole, so its values are checked as every other command checks them.
Every other command uses this instead of guessing.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
from pathlib import Path

from fusedit.convert.layout import model_layout
from fusedit.convert.lora_formats import (
    DIFFUSERS_METADATA_KEY,
    FUSEDIT_METADATA_KEY,
    classify_keys,
    lora_from_state_dict,
    lycoris_type,
    module_leaf,
    parse_lora_keys,
)
from fusedit.convert.single_file import MARKER_2511, WEIGHT_SCALE, has_2511_marker, is_scaled_fp8, weight_keys
from fusedit.download import component_names
from fusedit.errors import UserFileNotFoundError, UserInputError, examples
from fusedit.families import QWEN_IMAGE_21, pipeline_family
from fusedit.io import load_safetensors, read_safetensors_header
from fusedit.model.module_map import BLOCKS, QWEN21_TRANSFORMER_CLASS, block_index
from fusedit.model.weight_files import read_json, transformer_weight_files

TRANSFORMER_CLASS = "QwenImageTransformer2DModel"
TRANSFORMER_CLASSES = (TRANSFORMER_CLASS, QWEN21_TRANSFORMER_CLASS)
# Keys only a 2.1 transformer has (either layout): what names the family of a single file without a config.
QWEN21_MLP_KEYS = (".img_mlp.gate_layer.weight", ".img_mlp.gate_up_proj.weight")


def _dtype_summary(specs: dict) -> dict:
    by_dtype = collections.Counter()
    for dtype, shape in specs.values():
        by_dtype[dtype] += math.prod(shape)
    return {
        "dtype": by_dtype.most_common(1)[0][0] if by_dtype else None,
        "dtypes": dict(by_dtype),
        "parameter_count": sum(by_dtype.values()),
    }


def _header_specs(path: Path) -> tuple[dict, dict]:
    header, metadata = read_safetensors_header(path)
    return {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items()}, metadata


def _transformer_specs(directory: Path) -> dict:
    weights = transformer_weight_files(directory)
    specs = {}
    for file in weights.files:
        specs.update(_header_specs(file)[0])
    if weights.index is not None:
        missing = sorted(set(read_json(weights.index)["weight_map"]) - set(specs))
        if missing:
            raise UserInputError(f"{weights.index}: keys in weight_map but in no shard: {examples(missing)}")
    return specs


def _model_report(specs: dict, config: dict | None, what: str) -> dict:
    img_in = [k for k in specs if k.endswith("img_in.weight")]
    blocks = {index for key in specs if (index := block_index(key)) is not None}
    if len(img_in) != 1 or not blocks:
        raise UserInputError(
            f"{what}: not a Qwen-Image transformer (no img_in.weight / transformer_blocks.N keys); "
            f"found {len(specs)} tensors like {', '.join(sorted(specs)[:5])}"
        )
    prefix = img_in[0][: -len("img_in.weight")]
    hidden, in_channels = specs[img_in[0]][1]
    norm_q = specs.get(f"{prefix}{BLOCKS}.{min(blocks)}.attn.norm_q.weight")
    head_dim = norm_q[1][0] if norm_q else None
    config = config or {}
    heads = config.get("num_attention_heads") or (hidden // head_dim if head_dim else None)
    report = {
        "layout": model_layout(specs, what),
        "layers": config.get("num_layers", len(blocks)),
        "hidden_size": hidden,
        "heads": heads,
        "head_dim": config.get("attention_head_dim", head_dim),
        "in_channels": in_channels,
        "key_prefix": prefix,
        **_dtype_summary(specs),
    }
    if report["layout"] is None:
        raise UserInputError(f"{what}: no attention q/k/v projections found among {len(specs)} tensors")
    if config:
        report["zero_cond_t"] = bool(config.get("zero_cond_t", False))
        if config.get("num_layers") is not None and config["num_layers"] != len(blocks):
            raise UserInputError(
                f"{what}: config says {config['num_layers']} layers, weights have {len(blocks)} blocks"
            )
    return report


def _transformer_family(config: dict) -> tuple[str, str]:
    if config.get("_class_name") == QWEN21_TRANSFORMER_CLASS:
        return QWEN_IMAGE_21, f"transformer config _class_name {QWEN21_TRANSFORMER_CLASS}"
    if config.get("zero_cond_t"):
        return "qwen-image-edit-2511", "transformer config zero_cond_t=true"
    return "qwen-image", "transformer config only (Qwen-Image, -Edit and -Edit-2509 share one transformer config)"


def _detect_transformer(directory: Path) -> dict:
    config = read_json(directory / "config.json")
    cls = config.get("_class_name")
    if cls is not None and cls not in TRANSFORMER_CLASSES:
        raise UserInputError(f"{directory}/config.json: _class_name is {cls!r}, not one of {TRANSFORMER_CLASSES}")
    report = _model_report(_transformer_specs(directory), config, str(directory))
    family, source = _transformer_family(config)
    return {"kind": "transformer", "path": str(directory), "family": family, "family_source": source, **report}


def _detect_pipeline(directory: Path) -> dict:
    index = read_json(directory / "model_index.json")
    cls = index.get("_class_name", "")
    if not (directory / "transformer" / "config.json").is_file():
        raise UserInputError(f"{directory}: pipeline ({cls}) without transformer/config.json")
    transformer = _detect_transformer(directory / "transformer")
    family = pipeline_family(cls, transformer.get("zero_cond_t", False))
    transformer.pop("family_source")
    return {
        **transformer,
        "kind": "pipeline",
        "path": str(directory),
        "pipeline_class": cls,
        "family": family,
        "components": component_names(index),
    }


def _detect_lora(path: Path, specs: dict, metadata: dict, adapter_config: dict | None) -> dict:
    # A LoRA is read whole (it is small) through the same reader every command uses, so detect refuses exactly
    # what they refuse (NaN/inf values or alphas, rank 0, patch keys) instead of printing a report (or NaN, which
    # is not JSON) for a file nothing can use.
    parsed = parse_lora_keys(specs, str(path))
    lora = lora_from_state_dict(load_safetensors(path)[0], metadata, adapter_config, str(path))
    ranks = {m: mod.rank for m, mod in lora.modules.items()}
    alphas = {m: mod.alpha for m, mod in lora.modules.items()}
    has_alpha_tensors = any("alpha" in roles for roles in parsed.modules.values())
    has_config = adapter_config is not None or any(
        k in metadata for k in (DIFFUSERS_METADATA_KEY, FUSEDIT_METADATA_KEY)
    )
    layout = model_layout((f"{m}.weight" for m in lora.modules), str(path))
    blocks = sorted({index for name in lora.modules if (index := block_index(name + ".")) is not None})
    report = {
        "kind": "lora",
        "path": str(path),
        "adapter_type": lora.adapter_type,  # "dora": PEFT's DoRA, a magnitude vector per module beside A and B
        "format": lora.format,
        "key_style": f"{parsed.prefix or '(no prefix)'} {parsed.style}",
        "layout": layout or "any (no q/k/v modules)",
        "ranks": sorted(set(ranks.values())),
        "alphas": sorted(set(alphas.values())),
        "scales": sorted({mod.scale for mod in lora.modules.values()}),
        "target_modules": sorted({module_leaf(m) for m in lora.modules}),
        "num_modules": len(lora.modules),
        "blocks": blocks,
        "alpha_source": "alpha tensors" if has_alpha_tensors else ("metadata" if has_config else "rank"),
        **_dtype_summary(specs),
    }
    report["rank"] = report["ranks"][0] if len(report["ranks"]) == 1 else None
    report["alpha"] = report["alphas"][0] if len(report["alphas"]) == 1 else None
    if len(report["ranks"]) > 1 or len(report["alphas"]) > 1:
        report["per_module"] = {m: {"rank": ranks[m], "alpha": alphas[m]} for m in sorted(ranks)}
    return report


def _detect_lycoris(path: Path, specs: dict, adapter: str) -> dict:
    """A LoKr / LoHa file (ComfyUI's / LyCORIS' keys, as lora.type=lokr|loha exports): read whole through the
    reader infer.py applies it with, so a module missing a factor is refused here too."""
    from fusedit.lora.lycoris import MERGED_GROUPS, read_lycoris

    modules = read_lycoris(load_safetensors(path)[0], str(path))
    merged = any(module_leaf(m).rpartition(".")[2] in MERGED_GROUPS for m in modules)
    blocks = sorted({index for name in modules if (index := block_index(name + ".")) is not None})
    return {
        "kind": "lora",
        "path": str(path),
        "adapter_type": adapter.lower(),  # applied by infer.py with lora.fuse=true (docs/inference.md)
        "format": "comfyui",
        "key_style": "diffusion_model. " + ("lokr_w1 / lokr_w2" if adapter == "LoKr" else "hada_w1_a / hada_w2_a"),
        "layout": "merged_qkv" if merged else "standard",
        "scales": sorted({scale for _, scale in modules.values()}),  # ComfyUI's alpha rule, at strength 1
        "target_modules": sorted({module_leaf(m) for m in modules}),
        "num_modules": len(modules),
        "blocks": blocks,
        **_dtype_summary(specs),
    }


def detect(path: str | os.PathLike) -> dict:
    """Describe the checkpoint at `path` (see module docstring). Raises ValueError for anything not Qwen-Image."""
    path = Path(path)
    if not path.exists():
        raise UserFileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return _detect_pipeline(path)
        if (path / "adapter_config.json").is_file():
            files = sorted(path.glob("*.safetensors"))
            if len(files) != 1:
                raise UserInputError(f"{path}: PEFT LoRA folder must hold one .safetensors file, found {len(files)}")
            specs, metadata = _header_specs(files[0])
            return _detect_lora(files[0], specs, metadata, read_json(path / "adapter_config.json"))
        if (path / "config.json").is_file():
            return _detect_transformer(path)
        found = ", ".join(sorted(p.name for p in path.iterdir())[:10]) or "nothing"
        raise UserInputError(
            f"{path}: not a Qwen-Image pipeline (model_index.json), transformer (config.json) or LoRA folder "
            f"(adapter_config.json); found {found}"
        )
    if path.suffix != ".safetensors":
        raise UserInputError(f"{path}: not a .safetensors file, a pipeline folder or a transformer folder")
    specs, metadata = _header_specs(path)
    adapter = lycoris_type(specs)
    if adapter:
        return _detect_lycoris(path, specs, adapter)
    if classify_keys(specs, str(path)) == "lora":
        return _detect_lora(path, specs, metadata, None)
    return _detect_model_file(path, specs)


def _detect_model_file(path: Path, specs: dict) -> dict:
    """A single model file, ComfyUI's repackagings included (`fusedit.convert.single_file`): the 2511 marker gives
    the family; in an "fp8 scaled" file the dtypes and parameter count are those of the weights (no scales)."""
    weights = {key: specs[key] for key in weight_keys(specs)}
    report = {"kind": "model_file", "path": str(path), **_model_report(weights, None, str(path))}
    if any(key.endswith(QWEN21_MLP_KEYS) for key in specs):
        report["family"] = QWEN_IMAGE_21
        report["family_source"] = "Qwen-Image-2.1 SwiGLU keys (img_mlp.gate_layer / img_mlp.gate_up_proj)"
    if has_2511_marker(specs):
        report["family"] = "qwen-image-edit-2511"
        report["family_source"] = f"{MARKER_2511} marker tensor (ComfyUI's Edit-2511 single files)"
    if is_scaled_fp8(specs):
        report["quantization"] = "fp8_scaled"
        report["scaled_weights"] = sum(1 for key in specs if key.endswith("." + WEIGHT_SCALE))
    return report


def add_cli(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "detect",
        description="Print a JSON report: kind, family, layout, layers, hidden size, heads, dtype, parameter count; "
        "for a LoRA its format, layout, ranks, alphas and target modules. Reads headers and configs only.",
    )
    parser.add_argument("path", metavar="PATH")
    parser.set_defaults(func=_run)
    return parser


def _run(args: argparse.Namespace) -> int:
    print(json.dumps(detect(args.path), indent=2))
    return 0
