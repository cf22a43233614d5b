"""LoRA files in every format people exchange for Qwen-Image, normalised to one in-memory form.

Formats (how a module `transformer_blocks.0.attn.to_q` is spelled, and where its strength lives):

- diffusers: `transformer.<module>.lora_A.weight` / `.lora_B.weight`; alpha in the safetensors metadata key
  `lora_adapter_metadata` (a JSON LoraConfig with keys prefixed `transformer.`), else alpha = rank.
- peft: `<module>.lora_A.weight` (bare, as `transformer.save_lora_adapter` writes) or with `base_model.model.`;
  alpha in `lora_adapter_metadata` (unprefixed keys) or an `adapter_config.json` beside the file.
- diffsynth: bare `<module>.lora_A.default.weight`; DiffSynth applies B·A unscaled, so alpha = rank.
- comfyui: `diffusion_model.<module>.lora_A.weight` plus an optional scalar `diffusion_model.<module>.alpha`.
- kohya (sd-scripts, musubi-tuner): `lora_unet_<module with . -> _>.lora_down.weight` / `.lora_up.weight` /
  `.alpha`; a missing alpha means alpha = rank.

Everywhere the effective update is `B @ A * alpha / rank` (PEFT's scale). `read_lora` resolves each module's alpha
once; `write_lora` stores it the way the target format's own loader reads it, and always also as JSON in the
`fusedit_lora` metadata key.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fusedit.io import load_safetensors, save_safetensors_atomic
from fusedit.model.module_map import BLOCK_LINEARS, BLOCK_MODULE_RE, BLOCKS, TOP_LEVEL_LINEARS, block_module
from fusedit.pickle_files import pickle_refusal

from .layout import DIRECTION_TO, LAYOUTS, key_examples, layout_of_modules

FORMATS = ("diffusers", "peft", "diffsynth", "comfyui", "kohya")
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
FUSEDIT_METADATA_KEY = "fusedit_lora"

_KOHYA_BLOCK_RE = re.compile(rf"^{BLOCKS}_(\d+)_(.+)$")
_KOHYA_LEAVES = {leaf.replace(".", "_"): leaf for leaf in BLOCK_LINEARS}
_KOHYA_TOP = {name.replace(".", "_"): name for name in TOP_LEVEL_LINEARS}


def is_qwen_module(module: str) -> bool:
    """Whether `module` is a Linear of QwenImageTransformer2DModel (either layout)."""
    if module in TOP_LEVEL_LINEARS:
        return True
    match = BLOCK_MODULE_RE.match(module)
    return bool(match) and match[2] in BLOCK_LINEARS


def module_leaf(module: str) -> str:
    """`transformer_blocks.7.attn.to_out.0` -> `attn.to_out.0`; top-level names unchanged."""
    match = BLOCK_MODULE_RE.match(module)
    return match[2] if match else module


def kohya_name(module: str) -> str:
    return "lora_unet_" + module.replace(".", "_")


def module_from_kohya(name: str) -> str | None:
    """Inverse of `kohya_name` for Qwen-Image modules (underscores inside names make a table necessary)."""
    body = name.removeprefix("lora_unet_")
    if body in _KOHYA_TOP:
        return _KOHYA_TOP[body]
    match = _KOHYA_BLOCK_RE.match(body)
    if match and match[2] in _KOHYA_LEAVES:
        return block_module(int(match[1]), _KOHYA_LEAVES[match[2]])
    return None


@dataclass
class LoraModule:
    A: torch.Tensor  # [rank, in_features]
    B: torch.Tensor  # [out_features, rank]
    alpha: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """The effective weight update B·A·scale, in fp32."""
        return (self.B.float() @ self.A.float()) * self.scale


@dataclass
class LoraWeights:
    """A LoRA for the Qwen-Image transformer: module path (no `transformer.` prefix) -> (A, B, alpha)."""

    modules: dict[str, LoraModule]
    format: str = "diffusers"
    metadata: dict[str, str] = field(default_factory=dict)
    prefix: str = ""  # the source's key prefix, reused when writing the same format back
    # merged module -> how it was built from q/k/v (see lora_qkv), so un-merging restores the original factors
    qkv_split: dict[str, dict] = field(default_factory=dict)

    @property
    def layout(self) -> str | None:
        return layout_of_modules(self.modules, "LoRA")


# ---------------------------------------------------------------------------------------------------- reading keys
@dataclass
class ParsedKeys:
    format: str
    prefix: str
    # module -> {"A": key, "B": key, "alpha": key (optional)}
    modules: dict[str, dict[str, str]]


_PEFT_SUFFIXES = {
    ".lora_A.weight": ("A", False),
    ".lora_B.weight": ("B", False),
    ".lora_A.default.weight": ("A", True),
    ".lora_B.default.weight": ("B", True),
    ".alpha": ("alpha", None),
}
_KOHYA_SUFFIXES = {".lora_down.weight": "A", ".lora_up.weight": "B", ".alpha": "alpha"}
_PREFIX_FORMAT = {"transformer.": "diffusers", "diffusion_model.": "comfyui", "base_model.model.": "peft", "": "peft"}


def is_lora_key(key: str) -> bool:
    return ".lora_" in key or key.startswith("lora_unet_") or key.endswith(".alpha")


def parse_lora_keys(keys: Iterable[str], what: str = "LoRA") -> ParsedKeys:
    """Recognise the format of LoRA keys and group them per module, from the names alone."""
    keys = list(keys)
    if not keys:
        raise ValueError(f"{what}: no tensors")
    styles: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
    modules: dict[str, dict[str, str]] = collections.defaultdict(dict)
    unknown, not_qwen = [], []
    for key in keys:
        if key.startswith("lora_unet_"):
            name, dot, suffix = key.partition(".")
            role = _KOHYA_SUFFIXES.get(dot + suffix)
            module = module_from_kohya(name) if role else None
            if role is None:
                unknown.append(key)
            elif module is None:
                not_qwen.append(key)
            else:
                styles[("kohya", "lora_unet_")].append(key)
                modules[module][role] = key
            continue
        for suffix, (role, default) in _PEFT_SUFFIXES.items():  # noqa: B007 - used after the loop
            if key.endswith(suffix):
                path = key[: -len(suffix)]
                break
        else:
            unknown.append(key)
            continue
        prefix = next((p for p in ("transformer.", "diffusion_model.", "base_model.model.") if path.startswith(p)), "")
        module = path[len(prefix) :]
        if not is_qwen_module(module):
            not_qwen.append(key)
            continue
        fmt = "diffsynth" if default and prefix == "" else _PREFIX_FORMAT[prefix]
        if role != "alpha":  # an alpha key fits any lora_A/lora_B style with the same prefix
            styles[(fmt, prefix)].append(key)
        modules[module][role] = key
    if unknown:
        raise ValueError(
            f"{what}: unknown keys (neither lora_A/lora_B/lora_down/lora_up weights nor .alpha): {key_examples(unknown)}"
        )
    if not_qwen:
        raise ValueError(f"{what}: keys that name no Qwen-Image transformer module: {key_examples(not_qwen)}")
    if len(styles) > 1:
        found = "; ".join(f"{fmt} ({key_examples(ks, 2)})" for (fmt, _), ks in styles.items())
        raise ValueError(f"{what}: mixed LoRA key formats: {found}")
    if not styles:
        raise ValueError(f"{what}: only .alpha keys, no LoRA weights: {key_examples(keys)}")
    (fmt, prefix), _ = next(iter(styles.items()))
    incomplete = [f"{module} has {sorted(roles)}" for module, roles in modules.items() if not {"A", "B"} <= set(roles)]
    if incomplete:
        raise ValueError(f"{what}: modules without both LoRA factors: {key_examples(incomplete)}")
    if fmt != "kohya":
        stray = [
            roles["alpha"] for roles in modules.values() if "alpha" in roles and not roles["alpha"].startswith(prefix)
        ]
        if stray:
            raise ValueError(f"{what}: .alpha keys with a prefix other than {prefix!r}: {key_examples(stray)}")
    layout_of_modules(modules, what)
    return ParsedKeys(fmt, prefix, dict(modules))


# --------------------------------------------------------------------------------------------------- alpha values
def _pattern_value(patterns: Mapping[str, float], module: str):
    # PEFT's get_pattern_key: a pattern matches a module path ending in it at a `.` boundary
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return None


def _peft_config_alphas(config: Mapping, ranks: Mapping[str, int], what: str) -> dict[str, float]:
    alphas = {}
    r_default = config.get("r")
    for module, rank in ranks.items():
        expected_rank = _pattern_value(config.get("rank_pattern") or {}, module)
        expected_rank = expected_rank if expected_rank is not None else r_default
        if expected_rank is not None and int(expected_rank) != rank:
            raise ValueError(f"{what}: {module} has rank {rank} but its LoRA config says {expected_rank}")
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module)
        alpha = float(alpha if alpha is not None else config.get("lora_alpha", rank))
        if config.get("use_rslora"):
            alpha = alpha * rank / math.sqrt(rank)  # rsLoRA scales by alpha/sqrt(r); keep scale = alpha/r exact-ish
        alphas[module] = alpha
    return alphas


def _diffusers_config(metadata: Mapping[str, str], what: str) -> dict | None:
    raw = metadata.get(DIFFUSERS_METADATA_KEY)
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"{what}: metadata {DIFFUSERS_METADATA_KEY} is not JSON: {error}") from None
    if any(key.startswith("transformer.") for key in config):
        config = {k.removeprefix("transformer."): v for k, v in config.items() if k.startswith("transformer.")}
    return config


def resolve_alphas(
    ranks: Mapping[str, int],
    alpha_values: Mapping[str, float],
    metadata: Mapping[str, str],
    adapter_config: Mapping | None = None,
    what: str = "LoRA",
) -> dict[str, float]:
    """Alpha per module. Precedence: a per-module `.alpha` tensor, diffusers' LoraConfig metadata, a PEFT
    adapter_config.json, fusedit's own metadata, and finally alpha = rank (scale 1, what every loader assumes)."""
    sources = []
    config = _diffusers_config(metadata, what)
    if config is not None:
        sources.append(_peft_config_alphas(config, ranks, what))
    if adapter_config is not None:
        sources.append(_peft_config_alphas(adapter_config, ranks, what))
    raw = metadata.get(FUSEDIT_METADATA_KEY)
    if raw:
        sources.append({k: float(v) for k, v in (json.loads(raw).get("alphas") or {}).items()})
    alphas = {}
    for module, rank in ranks.items():
        if module in alpha_values:
            alphas[module] = float(alpha_values[module])
            continue
        alphas[module] = next((float(s[module]) for s in sources if module in s), float(rank))
    return alphas


def _qkv_split_from_metadata(metadata: Mapping[str, str]) -> dict[str, dict]:
    raw = metadata.get(FUSEDIT_METADATA_KEY)
    return dict(json.loads(raw).get("qkv_split") or {}) if raw else {}


# ------------------------------------------------------------------------------------------------------- reading
def lora_from_state_dict(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    adapter_config: Mapping | None = None,
    what: str = "LoRA",
) -> LoraWeights:
    metadata = dict(metadata or {})
    parsed = parse_lora_keys(tensors, what)
    problems, modules = [], {}
    ranks, alpha_values = {}, {}
    for module, roles in parsed.modules.items():
        A, B = tensors[roles["A"]], tensors[roles["B"]]
        if A.ndim != 2 or B.ndim != 2 or B.shape[1] != A.shape[0]:
            problems.append(f"{roles['A']} {list(A.shape)} / {roles['B']} {list(B.shape)}: not a [r,in] / [out,r] pair")
            continue
        ranks[module] = A.shape[0]
        if "alpha" in roles:
            alpha = tensors[roles["alpha"]]
            if alpha.numel() != 1:
                problems.append(f"{roles['alpha']}: alpha must be a scalar, has shape {list(alpha.shape)}")
                continue
            alpha_values[module] = alpha.item()
    if problems:
        raise ValueError(f"{what}: shape mismatches:\n  " + "\n  ".join(problems))
    # The one place every LoRA read passes (inference, conversion, detect-and-load): NaN/inf weights would turn
    # every generated image black or into noise, far from the file that caused it.
    nonfinite = [
        key
        for roles in parsed.modules.values()
        for key in roles.values()
        if tensors[key].is_floating_point() and not bool(torch.isfinite(tensors[key]).all())
    ]
    if nonfinite:
        raise ValueError(f"{what}: non-finite (NaN/inf) values in {len(nonfinite)} tensors: {key_examples(nonfinite)}")
    alphas = resolve_alphas(ranks, alpha_values, metadata, adapter_config, what)
    for module, roles in parsed.modules.items():
        modules[module] = LoraModule(tensors[roles["A"]], tensors[roles["B"]], alphas[module])
    return LoraWeights(modules, parsed.format, metadata, parsed.prefix, _qkv_split_from_metadata(metadata))


def read_lora(path: str | os.PathLike) -> LoraWeights:
    """Read a LoRA safetensors file in any supported format (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        candidates = sorted(path.glob("*.safetensors"))
        if len(candidates) != 1:
            raise ValueError(
                f"{path}: a LoRA directory must hold exactly one .safetensors file, found {len(candidates)}"
            )
        path = candidates[0]
    refusal = pickle_refusal(path)
    if refusal:
        raise ValueError(refusal)
    tensors, metadata = load_safetensors(path)
    adapter_config = None
    config_path = path.parent / "adapter_config.json"
    if config_path.is_file():
        adapter_config = json.loads(config_path.read_text(encoding="utf-8"))
    return lora_from_state_dict(tensors, metadata, adapter_config, what=str(path))


# ------------------------------------------------------------------------------------------------------- writing
def _alpha_tensor(alpha: float) -> torch.Tensor:
    as_f32 = torch.tensor(alpha, dtype=torch.float32)
    return as_f32 if as_f32.item() == alpha else torch.tensor(alpha, dtype=torch.float64)


def _most_common(values: Iterable):
    return collections.Counter(values).most_common(1)[0][0]


def peft_config_dict(lora: LoraWeights) -> dict:
    """The LoraConfig fields diffusers/PEFT need to rebuild this LoRA with the right ranks and alphas."""
    ranks = {m: mod.rank for m, mod in lora.modules.items()}
    alphas = {m: mod.alpha for m, mod in lora.modules.items()}
    r = _most_common(ranks.values())
    lora_alpha = _most_common(alphas.values())
    return {
        "r": r,
        "lora_alpha": lora_alpha,
        "rank_pattern": {m: v for m, v in ranks.items() if v != r},
        "alpha_pattern": {m: v for m, v in alphas.items() if v != lora_alpha},
        "target_modules": sorted(lora.modules),
        "use_dora": False,
        "lora_bias": False,
    }


def fusedit_metadata(lora: LoraWeights) -> dict:
    config = peft_config_dict(lora)
    return {
        "layout": lora.layout,
        "rank": config["r"],
        "alpha": config["lora_alpha"],
        "ranks": {m: mod.rank for m, mod in lora.modules.items()},
        "alphas": {m: mod.alpha for m, mod in lora.modules.items()},
        "qkv_split": lora.qkv_split,
    }


def lora_to_state_dict(lora: LoraWeights, format: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Render a LoRA in `format` (default: the format it was read in). Returns (tensors, metadata)."""
    fmt = format or lora.format
    if fmt not in FORMATS:
        raise ValueError(f"unknown LoRA format {fmt!r}; choose one of {FORMATS}")
    modules = dict(lora.modules)
    if fmt == "diffsynth":
        # DiffSynth applies B·A with no alpha: bake any scale != 1 into B (exact when the scale is a power of two)
        modules = {
            m: mod
            if mod.scale == 1.0
            else LoraModule(mod.A, (mod.B.float() * mod.scale).to(mod.B.dtype), float(mod.rank))
            for m, mod in modules.items()
        }
        # a merge record's factors are relative to the merged scale, which is now 1
        qkv_split = {
            m: {**record, "factors": [f * lora.modules[m].scale for f in record["factors"]]}
            for m, record in lora.qkv_split.items()
            if m in lora.modules
        }
        lora = LoraWeights(modules, fmt, lora.metadata, "", qkv_split)
    tensors: dict[str, torch.Tensor] = {}
    for module, mod in modules.items():
        if fmt == "kohya":
            name = kohya_name(module)
            tensors[f"{name}.lora_down.weight"] = mod.A
            tensors[f"{name}.lora_up.weight"] = mod.B
            tensors[f"{name}.alpha"] = _alpha_tensor(mod.alpha)
            continue
        prefix = {"diffusers": "transformer.", "comfyui": "diffusion_model.", "diffsynth": ""}.get(fmt)
        if prefix is None:  # peft: keep the source's own prefix when it was peft, else bare
            prefix = lora.prefix if lora.format == "peft" else ""
        adapter = ".default" if fmt == "diffsynth" else ""
        tensors[f"{prefix}{module}.lora_A{adapter}.weight"] = mod.A
        tensors[f"{prefix}{module}.lora_B{adapter}.weight"] = mod.B
        if fmt == "comfyui":
            tensors[f"{prefix}{module}.alpha"] = _alpha_tensor(mod.alpha)
    metadata = {k: v for k, v in lora.metadata.items() if k not in (DIFFUSERS_METADATA_KEY, FUSEDIT_METADATA_KEY)}
    metadata.setdefault("format", "pt")
    metadata[FUSEDIT_METADATA_KEY] = json.dumps(fusedit_metadata(lora), sort_keys=True)
    if fmt in ("diffusers", "peft"):
        # diffusers builds its LoraConfig straight from this JSON (must not ALSO have .alpha keys, or it scales twice)
        config = peft_config_dict(lora)
        if fmt == "diffusers":
            config = {f"transformer.{k}": v for k, v in config.items()}
        metadata[DIFFUSERS_METADATA_KEY] = json.dumps(config, indent=2, sort_keys=True)
    return tensors, metadata


def write_lora(
    lora: LoraWeights, path: str | os.PathLike, format: str = "diffusers", layout: str | None = None
) -> Path:
    """Write `lora` to one safetensors file, atomically, in `format` and (optionally converted to) `layout`."""
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout is not None and layout != lora.layout and lora.layout is not None:
        from .lora_qkv import convert_lora_layout

        lora = convert_lora_layout(lora, DIRECTION_TO[layout])
    tensors, metadata = lora_to_state_dict(lora, format)
    save_safetensors_atomic(tensors, path, metadata)
    return Path(path)
