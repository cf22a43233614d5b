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

Reading also takes every other prefix and factor style ComfyUI's Qwen-Image loader accepts (`KEY_STYLES`).

Everywhere the effective update is `B @ A * alpha / rank` (PEFT's scale). A DoRA LoRA (PEFT's `use_dora`, fusedit's
`lora.type=dora`) also carries a magnitude vector m per module, `<module>.lora_magnitude_vector` [out_features] as
PEFT and diffusers name it, and its weight is m * (W + s B A) / ||W + s B A|| (norm per output row): it is read in
the diffusers / peft formats and written only there, since the other formats' loaders cannot apply it
(`DORA_FORMATS`; docs/conversion.md, "DoRA"). `read_lora` resolves each module's alpha
once. `write_lora` stores the scale so that diffusers' `load_lora_weights` and ComfyUI (which reads only `.alpha`
tensors, never metadata) both apply it: `.alpha` tensors in comfyui/kohya, folded into lora_B with alpha = rank in
diffusers/peft/diffsynth (`fold_scales`); always also as JSON in the `fusedit_lora` metadata key. See
docs/conversion.md ("Formats") for why.
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
from typing import TYPE_CHECKING

from fusedit.errors import UserInputError, examples
from fusedit.io import load_safetensors
from fusedit.model.module_map import ALL_BLOCK_LINEARS, ALL_TOP_LEVEL_LINEARS, BLOCK_MODULE_RE, BLOCKS, block_module
from fusedit.pickle_files import pickle_refusal

from .layout import layout_of_modules

if TYPE_CHECKING:  # key parsing needs names only (`fusedit detect` of a model file); the readers that touch
    import torch  # tensors get them from safetensors, which imports torch itself

FORMATS = ("diffusers", "peft", "diffsynth", "comfyui", "kohya")
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
FUSEDIT_METADATA_KEY = "fusedit_lora"

_KOHYA_BLOCK_RE = re.compile(rf"^{BLOCKS}_(\d+)_(.+)$")
_KOHYA_LEAVES = {leaf.replace(".", "_"): leaf for leaf in ALL_BLOCK_LINEARS}
_KOHYA_TOP = {name.replace(".", "_"): name for name in ALL_TOP_LEVEL_LINEARS}


def is_qwen_module(module: str) -> bool:
    """Whether `module` is a Linear of QwenImageTransformer2DModel or QwenImage21Transformer2DModel (either
    layout)."""
    if module in ALL_TOP_LEVEL_LINEARS:
        return True
    match = BLOCK_MODULE_RE.match(module)
    return bool(match) and match[2] in ALL_BLOCK_LINEARS


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
    # DoRA's magnitude m [out_features] (the adapted weight's target row norms), None for a plain LoRA
    magnitude: torch.Tensor | None = None

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

    @property
    def adapter_type(self) -> str:
        """ "dora" when its modules carry DoRA magnitudes (all of them: `lora_from_state_dict`), else "lora"."""
        return "dora" if any(mod.magnitude is not None for mod in self.modules.values()) else "lora"


# ---------------------------------------------------------------------------------------------------- reading keys
@dataclass
class ParsedKeys:
    format: str
    prefix: str
    # module -> {"A": key, "B": key, "alpha": key (optional), "magnitude": key (DoRA)}
    modules: dict[str, dict[str, str]]
    style: str = "lora_A/lora_B"  # the factor key style, as found (reported by detect)


# Factor key styles ComfyUI's LoRA adapter accepts (comfy/weight_adapter/lora.py), as (A suffix, B suffix, style).
# Longer suffixes first: `.lora_A.default.weight` must not be read as module `....lora_A.default` + `.weight`.
_FACTOR_SUFFIXES = (
    (".lora_A.default.weight", ".lora_B.default.weight", "lora_A/lora_B .default"),
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight", "lora_linear_layer.down/up"),
    (".lora_down.weight", ".lora_up.weight", "lora_down/lora_up"),
    (".lora_A.weight", ".lora_B.weight", "lora_A/lora_B"),
    (".lora.down.weight", ".lora.up.weight", "lora.down/lora.up"),
    ("_lora.down.weight", "_lora.up.weight", "_lora.down/_lora.up"),
    (".lora_A", ".lora_B", "lora_A/lora_B (no .weight)"),
)
_ALPHA_SUFFIX = ".alpha"
_MAGNITUDE_SUFFIX = ".lora_magnitude_vector"  # PEFT's / diffusers' DoRA magnitude (fusedit's lora.type=dora export)
# Keys ComfyUI applies that are not low-rank factors: full-weight / bias deltas and LoRA variants fusedit does not
# implement. Refused by name: reading only the factors would apply part of the file silently.
_PATCH_SUFFIXES = {
    ".diff": "full-weight delta",
    ".diff_b": "bias delta",
    ".set_weight": "weight replacement",
    ".w_norm": "norm weight",
    ".b_norm": "norm bias",
    # ComfyUI's / LyCORIS's DoRA: an output-row dora_scale is divided by the base weight's row norm, a [1, in] one
    # by the adapted weight's column norms; neither is PEFT's DoRA (`.lora_magnitude_vector`, read below).
    ".dora_scale": "ComfyUI/LyCORIS DoRA scale",
    ".lora_mid.weight": "LoCon mid factor",
    ".reshape_weight": "reshape instruction",
}
# LyCORIS adapters (fusedit's lora.type=lokr|loha export writes these keys): a file of only these is named by type.
_LYCORIS_MARKERS = {".lokr_": "LoKr", ".hada_": "LoHa"}
_PATCH_RE = re.compile(r"\.(hada_|lokr_|oft_|boft_|a1\.weight|a2\.weight|b1\.weight|b2\.weight)")
# Module prefixes ComfyUI's Qwen-Image key map accepts (comfy/lora.py model_lora_keys_unet), with the format a
# file using them is reported as (and written back in by default). `lora_unet_` / `lycoris_` flatten the module
# path with underscores; the others keep it dotted.
_FLAT_PREFIXES = {"lora_unet_": "kohya", "lycoris_": "kohya"}
_DOTTED_PREFIXES = {"transformer.": "diffusers", "diffusion_model.": "comfyui", "base_model.model.": "peft"}
KEY_STYLES = (
    "module prefixes transformer. / diffusion_model. / base_model.model. / none / lora_unet_ / lycoris_; "
    "factors " + ", ".join(style for _, _, style in _FACTOR_SUFFIXES) + "; optional .alpha; DoRA's "
    ".lora_magnitude_vector"
)


def is_lora_key(key: str) -> bool:
    """Whether a key belongs to a LoRA file rather than to model weights (patch keys included, so that a LoRA
    carrying them is refused by name instead of being taken for a broken model)."""
    return (
        ".lora" in key
        or "_lora." in key
        or key.startswith(tuple(_FLAT_PREFIXES))
        or key.endswith((_ALPHA_SUFFIX, *_PATCH_SUFFIXES))
        or bool(_PATCH_RE.search(key))
    )


def classify_keys(keys, what: str = "state dict") -> str:
    """Return "lora" when every key is a LoRA key, "model" when none is; a mix is an error naming the odd keys."""
    keys = list(keys)
    lora = [k for k in keys if is_lora_key(k)]
    if lora and len(lora) != len(keys):
        others = sorted(set(keys) - set(lora))
        raise UserInputError(f"{what} mixes LoRA keys ({examples(lora, 3)}) with other keys: {examples(others)}")
    return "lora" if lora else "model"


def _split_key(key: str) -> tuple[str, str, str] | None:
    """`key` -> (path before the suffix, role "A"/"B"/"alpha"/"magnitude", style), or None for a key that is none
    of those."""
    for a_suffix, b_suffix, style in _FACTOR_SUFFIXES:
        if key.endswith(a_suffix):
            return key[: -len(a_suffix)], "A", style
        if key.endswith(b_suffix):
            return key[: -len(b_suffix)], "B", style
    if key.endswith(_ALPHA_SUFFIX):
        return key[: -len(_ALPHA_SUFFIX)], "alpha", ""
    if key.endswith(_MAGNITUDE_SUFFIX):
        return key[: -len(_MAGNITUDE_SUFFIX)], "magnitude", ""
    return None


def _module_of(path: str) -> tuple[str, str | None]:
    """A key's path before its suffix -> (prefix, Qwen-Image module or None)."""
    for prefix in _FLAT_PREFIXES:
        if path.startswith(prefix):
            return prefix, module_from_kohya("lora_unet_" + path[len(prefix) :])
    prefix = next((p for p in _DOTTED_PREFIXES if path.startswith(p)), "")
    module = path[len(prefix) :]
    return prefix, (module if is_qwen_module(module) else None)


def _format_of(prefix: str, style: str) -> str:
    if prefix in _FLAT_PREFIXES:
        return _FLAT_PREFIXES[prefix]
    if prefix:
        return _DOTTED_PREFIXES[prefix]
    if style.endswith(".default"):
        return "diffsynth"
    # bare module names: lora_A/lora_B is PEFT's save_lora_adapter; lora_down/lora_up (+ .alpha, as the
    # "Lightning" LoRAs ship) keeps its alpha tensors when written back as comfyui
    return "peft" if style.startswith("lora_A") else "comfyui"


def lycoris_type(keys: Iterable[str]) -> str | None:
    """ "LoKr" / "LoHa" for a file of only that adapter's keys (and `.alpha`), as fusedit's lora.type=lokr|loha
    export and LyCORIS write them; else None."""
    keys = list(keys)
    found = {name for key in keys for marker, name in _LYCORIS_MARKERS.items() if marker in key}
    only = all(key.endswith(_ALPHA_SUFFIX) or any(marker in key for marker in _LYCORIS_MARKERS) for key in keys)
    return found.pop() if len(found) == 1 and only else None


def check_not_lycoris(keys: Iterable[str], what: str) -> None:
    """UserInputError (one line, naming the adapter type) for a LoKr / LoHa file: the LoRA reader (convert, diffusers'
    API) takes LoRA factors only; infer.py applies these files itself (fusedit.inference.lora, lora.fuse=true)."""
    keys = list(keys)
    adapter = lycoris_type(keys)
    if adapter:
        factors = [key for key in keys if not key.endswith(_ALPHA_SUFFIX)]
        raise UserInputError(
            f"{what}: is a {adapter} adapter ({examples(factors, 2)}), not a LoRA: fusedit's conversion reads "
            "lora_A/lora_B (lora_down/lora_up) pairs only. Apply it with infer.py lora.fuse=true, or in ComfyUI "
            "(LoraLoaderModelOnly)"
        )


def parse_lora_keys(keys: Iterable[str], what: str = "LoRA") -> ParsedKeys:
    """Recognise the format of LoRA keys and group them per module, from the names alone.

    Accepts every module prefix and factor style ComfyUI's Qwen-Image LoRA loader accepts (`KEY_STYLES`); one
    style per file. Raises ValueError naming the keys for: patch keys fusedit cannot apply (`.diff`, `.diff_b`,
    DoRA, LoHa/LoKr ...), unknown keys, keys naming no Qwen-Image Linear, mixed styles, a module missing a factor,
    and a rank-0 module is caught by `lora_from_state_dict` (shapes are not known here).
    """
    keys = list(keys)
    if not keys:
        raise UserInputError(f"{what}: no tensors")
    check_not_lycoris(keys, what)
    _refuse_patches(keys, what)
    styles: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
    modules: dict[str, dict[str, str]] = collections.defaultdict(dict)
    alpha_prefixes: dict[str, str] = {}
    unknown, not_qwen = [], []
    for key in keys:
        split = _split_key(key)
        if split is None:
            unknown.append(key)
            continue
        path, role, style = split
        prefix, module = _module_of(path)
        if module is None:
            not_qwen.append(key)
            continue
        if role in ("alpha", "magnitude"):  # fits any factor style with the same prefix
            alpha_prefixes[key] = prefix
        else:
            styles[(prefix, style)].append(key)
        modules[module][role] = key
    if unknown:
        raise UserInputError(f"{what}: keys in no LoRA key style fusedit reads ({KEY_STYLES}): {examples(unknown)}")
    if not_qwen:
        raise UserInputError(f"{what}: keys that name no Qwen-Image transformer module: {examples(not_qwen)}")
    if len(styles) > 1:
        found = "; ".join(
            f"{prefix or '(no prefix)'} {style} ({examples(ks, 2)})" for (prefix, style), ks in styles.items()
        )
        raise UserInputError(f"{what}: mixed LoRA key formats: {found}")
    if not styles:
        raise UserInputError(f"{what}: only .alpha / magnitude keys, no LoRA weights: {examples(keys)}")
    (prefix, style), _ = next(iter(styles.items()))
    incomplete = [f"{module} has {sorted(roles)}" for module, roles in modules.items() if not {"A", "B"} <= set(roles)]
    if incomplete:
        raise UserInputError(f"{what}: modules without both LoRA factors: {examples(incomplete)}")
    stray = [key for key, p in alpha_prefixes.items() if p != prefix]
    if stray:
        raise UserInputError(f"{what}: .alpha / magnitude keys with a prefix other than {prefix!r}: {examples(stray)}")
    dora = [module for module, roles in modules.items() if "magnitude" in roles]
    if dora and len(dora) != len(modules):
        plain = [module for module in modules if module not in dora]
        raise UserInputError(
            f"{what}: DoRA magnitudes ({_MAGNITUDE_SUFFIX}) on {len(dora)} modules but not on {examples(plain, 3)}; "
            "a DoRA LoRA has one per module"
        )
    layout_of_modules(modules, what)
    return ParsedKeys(_format_of(prefix, style), prefix, dict(modules), style)


def _refuse_patches(keys: list[str], what: str) -> None:
    """Raise UserInputError for tensors that patch weights other than as low-rank factors (`.diff`, ...)."""
    patches = [k for k in keys if k.endswith(tuple(_PATCH_SUFFIXES)) or _PATCH_RE.search(k)]
    if patches:
        kinds = sorted({next((v for s, v in _PATCH_SUFFIXES.items() if k.endswith(s)), "LyCORIS") for k in patches})
        raise UserInputError(
            f"{what}: holds {len(patches)} tensors that are not LoRA factors ({', '.join(kinds)}): "
            f"{examples(patches, 3)}; fusedit applies only low-rank lora_A/lora_B (lora_down/lora_up) pairs. "
            "Apply this file in ComfyUI, or save a copy without those keys if the LoRA part alone is what you want"
        )


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
            raise UserInputError(f"{what}: {module} has rank {rank} but its LoRA config says {expected_rank}")
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
        raise UserInputError(f"{what}: metadata {DIFFUSERS_METADATA_KEY} is not JSON: {error}") from None
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


def _fusedit_metadata_field(metadata: Mapping[str, str], name: str) -> dict:
    raw = metadata.get(FUSEDIT_METADATA_KEY)
    return dict(json.loads(raw).get(name) or {}) if raw else {}


# A LoRA scale (alpha / rank) beyond this is refused as absurd: trained LoRAs use scales around 0.01-100, and at
# 1e4 the update would already dwarf any Qwen-Image weight (NaN/inf alphas are refused too; see check_alphas).
MAX_ABS_SCALE = 1e4


def check_lora_values(weights: LoraWeights, alpha_keys: Mapping[str, str], what: str = "LoRA") -> None:
    """Refuse a LoRA whose alpha or scale is NaN, inf or beyond ±MAX_ABS_SCALE, naming the module and where its
    alpha came from (`alpha_keys`: module -> its `.alpha` key; else the metadata). Factor values are checked
    where the tensors are read (`lora_from_state_dict`)."""
    bad = []
    for module, mod in weights.modules.items():
        if not (math.isfinite(mod.alpha) and math.isfinite(mod.scale) and abs(mod.scale) <= MAX_ABS_SCALE):
            source = alpha_keys.get(module, f"metadata alpha of {module}")
            bad.append(f"{source} = {mod.alpha!r} (rank {mod.rank}, scale {mod.scale!r})")
    if bad:
        raise UserInputError(
            f"{what}: alpha or scale NaN, infinite or beyond ±{MAX_ABS_SCALE:g} in {len(bad)} modules: "
            f"{examples(bad, 3)}; this LoRA would produce black or noise images"
        )


# ------------------------------------------------------------------------------------------------------- reading
def lora_from_state_dict(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    adapter_config: Mapping | None = None,
    what: str = "LoRA",
) -> LoraWeights:
    """The LoRA in `tensors` (any key style `parse_lora_keys` reads), one alpha per module (`resolve_alphas`).

    Raises ValueError naming the keys for factor shapes that do not pair, a rank-0 module, a non-scalar alpha,
    NaN/inf factors and NaN/inf/absurd alphas (`check_lora_values`). A scale that fusedit itself folded into
    lora_B when writing (`folded_scales` in its metadata) is taken back out when that is exact (a power of two).
    """
    metadata = dict(metadata or {})
    parsed = parse_lora_keys(tensors, what)
    problems, modules = [], {}
    ranks, alpha_values = {}, {}
    for module, roles in parsed.modules.items():
        A, B = tensors[roles["A"]], tensors[roles["B"]]
        if A.ndim != 2 or B.ndim != 2 or B.shape[1] != A.shape[0]:
            problems.append(f"{roles['A']} {list(A.shape)} / {roles['B']} {list(B.shape)}: not a [r,in] / [out,r] pair")
            continue
        if A.shape[0] == 0:
            problems.append(f"{roles['A']} {list(A.shape)}: rank 0 (an empty LoRA module)")
            continue
        ranks[module] = A.shape[0]
        if "alpha" in roles:
            alpha = tensors[roles["alpha"]]
            if alpha.numel() != 1:
                problems.append(f"{roles['alpha']}: alpha must be a scalar, has shape {list(alpha.shape)}")
                continue
            alpha_values[module] = alpha.item()
        if "magnitude" in roles and tuple(tensors[roles["magnitude"]].shape) != (B.shape[0],):
            shape = list(tensors[roles["magnitude"]].shape)
            problems.append(f"{roles['magnitude']} {shape}: a DoRA magnitude has lora_B's {B.shape[0]} output rows")
    if problems:
        raise UserInputError(f"{what}: shape mismatches:\n  " + "\n  ".join(problems))
    # The one place every LoRA read passes (training init, inference, conversion, detect): NaN/inf weights would
    # turn every generated image black or into noise, far from the file that caused it.
    nonfinite = [
        key
        for roles in parsed.modules.values()
        for key in roles.values()
        if tensors[key].is_floating_point() and not bool(tensors[key].isfinite().all())
    ]
    if nonfinite:
        raise UserInputError(f"{what}: non-finite (NaN/inf) values in {len(nonfinite)} tensors: {examples(nonfinite)}")
    alphas = resolve_alphas(ranks, alpha_values, metadata, adapter_config, what)
    for module, roles in parsed.modules.items():
        magnitude = tensors[roles["magnitude"]] if "magnitude" in roles else None
        modules[module] = LoraModule(tensors[roles["A"]], tensors[roles["B"]], alphas[module], magnitude)
    weights = LoraWeights(
        modules, parsed.format, metadata, parsed.prefix, _fusedit_metadata_field(metadata, "qkv_split")
    )
    alpha_keys = {m: roles["alpha"] for m, roles in parsed.modules.items() if "alpha" in roles}
    check_lora_values(weights, alpha_keys, what)
    return _unfold_scales(weights, _fusedit_metadata_field(metadata, "folded_scales"))


def read_lora(path: str | os.PathLike) -> LoraWeights:
    """Read a LoRA safetensors file in any supported format (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        candidates = sorted(path.glob("*.safetensors"))
        if len(candidates) != 1:
            raise UserInputError(
                f"{path}: a LoRA directory must hold exactly one .safetensors file, found {len(candidates)}"
            )
        path = candidates[0]
    refusal = pickle_refusal(path)
    if refusal:
        raise UserInputError(refusal)
    tensors, metadata = load_safetensors(path)
    adapter_config = None
    config_path = path.parent / "adapter_config.json"
    if config_path.is_file():
        adapter_config = json.loads(config_path.read_text(encoding="utf-8"))
    return lora_from_state_dict(tensors, metadata, adapter_config, what=str(path))


# ------------------------------------------------------------------------------------------------------- writing
def _alpha_tensor(alpha: float) -> torch.Tensor:
    import torch

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
        "use_dora": lora.adapter_type == "dora",
        "lora_bias": False,
    }


def peft_adapter(weights: LoraWeights) -> tuple[dict[str, torch.Tensor], dict]:
    """The PEFT state dict and LoraConfig kwargs diffusers' `load_lora_adapter` takes for `weights`.

    Ranks and alphas that differ from the most common one go into `rank_pattern` / `alpha_pattern` keyed by the
    escaped module path, so every module keeps its own alpha / rank (a standard LoRA merged to the fused layout has
    rank r_q + r_k + r_v on its QKV modules, for example).
    """
    state_dict: dict[str, torch.Tensor] = {}
    for module, mod in weights.modules.items():
        state_dict[f"{module}.lora_A.weight"] = mod.A
        state_dict[f"{module}.lora_B.weight"] = mod.B
        if mod.magnitude is not None:
            state_dict[f"{module}{_MAGNITUDE_SUFFIX}"] = mod.magnitude
    config = peft_config_dict(weights)  # the fields a LoRA file's metadata carries too
    # PEFT matches pattern keys as regular expressions: a module path's dots must match only dots.
    for pattern in ("rank_pattern", "alpha_pattern"):
        config[pattern] = {re.escape(module): value for module, value in config[pattern].items()}
    config.update(lora_dropout=0.0, init_lora_weights=False)  # inference: no dropout, the weights come from the file
    return state_dict, config


def fusedit_metadata(lora: LoraWeights, folded_scales: Mapping[str, float] | None = None) -> dict:
    config = peft_config_dict(lora)
    return {
        "layout": lora.layout,
        "adapter_type": lora.adapter_type,
        "rank": config["r"],
        "alpha": config["lora_alpha"],
        "ranks": {m: mod.rank for m, mod in lora.modules.items()},
        "alphas": {m: mod.alpha for m, mod in lora.modules.items()},
        "qkv_split": lora.qkv_split,
        "folded_scales": dict(folded_scales or {}),
    }


def is_power_of_two(x: float) -> bool:
    """Whether multiplying by `x` is exact in floating point (barring overflow and subnormals)."""
    return x > 0 and math.frexp(x)[0] == 0.5


def fold_scales(lora: LoraWeights) -> tuple[LoraWeights, dict[str, float]]:
    """`lora` with every module's scale (alpha / rank) multiplied into lora_B and alpha = rank, and the folded
    scales (module -> scale, for scales != 1).

    This is how a file keeps its strength in every client without an alpha that both read the same way: diffusers
    takes alpha from its metadata (or applies `.alpha` tensors itself, and then must not find the metadata), ComfyUI
    only from `.alpha` tensors; with alpha = rank all of them use scale 1. Exact when the scale is a power of two,
    otherwise one rounding of each lora_B element (the product differs by at most half an ulp of lora_B's dtype).
    A merge record's factors are relative to the merged scale, which becomes 1.
    """
    folded = {m: mod.scale for m, mod in lora.modules.items() if mod.scale != 1.0}
    modules = {
        m: mod
        if m not in folded
        else LoraModule(mod.A, (mod.B.float() * mod.scale).to(mod.B.dtype), float(mod.rank), mod.magnitude)
        for m, mod in lora.modules.items()
    }
    qkv_split = {
        m: {**record, "factors": [f * folded.get(m, 1.0) for f in record["factors"]]}
        for m, record in lora.qkv_split.items()
        if m in lora.modules
    }
    return LoraWeights(modules, lora.format, lora.metadata, lora.prefix, qkv_split), folded


def _unfold_scales(lora: LoraWeights, folded: Mapping[str, float]) -> LoraWeights:
    """Undo `fold_scales` where that is exact (a power-of-two scale, file unchanged since: alpha still = rank);
    other modules keep the folded lora_B with scale 1, the same product."""
    exact = {
        m: float(s)
        for m, s in folded.items()
        if m in lora.modules and is_power_of_two(float(s)) and lora.modules[m].alpha == lora.modules[m].rank
    }
    if not exact:
        return lora
    modules = {
        m: mod
        if m not in exact
        else LoraModule(mod.A, (mod.B.float() / exact[m]).to(mod.B.dtype), exact[m] * mod.rank, mod.magnitude)
        for m, mod in lora.modules.items()
    }
    qkv_split = {
        m: {**record, "factors": [f / exact.get(m, 1.0) for f in record["factors"]]}
        for m, record in lora.qkv_split.items()
    }
    return LoraWeights(modules, lora.format, lora.metadata, lora.prefix, qkv_split)


# Where each written format keeps a module's scale, so that diffusers' load_lora_weights and ComfyUI's loader
# (scale = `.alpha` tensor / rank, else 1; safetensors metadata never read) both apply the trained strength:
# `.alpha` tensors for the formats that have them (diffusers folds them into the factors itself), folded into
# lora_B for the metadata-only formats (see fold_scales; DiffSynth has no alpha at all).
ALPHA_TENSOR_FORMATS = ("comfyui", "kohya")
FOLDED_FORMATS = ("diffusers", "peft", "diffsynth")
# Formats whose readers know only diffusers' module names: a merged-layout LoRA is written split (exactly).
STANDARD_ONLY_FORMATS = ("comfyui", "kohya")
# Formats that hold a DoRA LoRA: PEFT's `lora_magnitude_vector` with `use_dora` in the LoraConfig metadata, which
# diffusers' load_lora_weights and PEFT rebuild. ComfyUI's `dora_scale` (read by ComfyUI for comfyui and kohya keys)
# divides an output-row scale by the *base* weight's row norm, not by the adapted weight's as DoRA does
# (comfy/weight_adapter/base.py weight_decompose, d9dc02a7; tests/test_comfyui_loader.py measures it), so no
# magnitude written there gives the trained weight; DiffSynth applies B·A alone.
DORA_FORMATS = ("diffusers", "peft")
DORA_REFUSALS = {
    "comfyui": "ComfyUI's dora_scale divides by the base weight's row norm, not the adapted weight's as DoRA does",
    "kohya": "its readers (ComfyUI, kohya tools) apply dora_scale, which is not DoRA's row norm of the adapted weight",
    "diffsynth": "DiffSynth applies lora_B @ lora_A alone, without a magnitude",
}


def lora_to_state_dict(lora: LoraWeights, format: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Render a LoRA in `format` (default: the format it was read in). Returns (tensors, metadata).

    The scale is stored as `ALPHA_TENSOR_FORMATS` / `FOLDED_FORMATS` say; the original alphas, ranks and folded
    scales also go into the `fusedit_lora` metadata JSON.
    """
    fmt = format or lora.format
    if fmt not in FORMATS:
        raise UserInputError(f"unknown LoRA format {fmt!r}; choose one of {FORMATS}")
    if fmt in STANDARD_ONLY_FORMATS and lora.layout == "merged_qkv":
        raise UserInputError(
            f"a {fmt} LoRA cannot be written in the merged_qkv layout: its loaders (ComfyUI, kohya tools) know only "
            "the standard to_q/to_k/to_v names and would skip the merged modules; write it standard (the split is "
            "exact) or choose the diffusers/peft format"
        )
    if lora.adapter_type == "dora" and fmt not in DORA_FORMATS:
        raise UserInputError(
            f"a DoRA LoRA cannot be written as {fmt}: {DORA_REFUSALS[fmt]}; write it as "
            f"{' or '.join(DORA_FORMATS)} (diffusers' load_lora_weights and fusedit's infer.py load those)"
        )
    folded: dict[str, float] = {}
    if fmt in FOLDED_FORMATS:
        lora, folded = fold_scales(lora)
    tensors: dict[str, torch.Tensor] = {}
    for module, mod in lora.modules.items():
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
        if mod.magnitude is not None:
            tensors[f"{prefix}{module}{_MAGNITUDE_SUFFIX}"] = mod.magnitude.contiguous()
        if fmt == "comfyui":
            tensors[f"{prefix}{module}.alpha"] = _alpha_tensor(mod.alpha)
    metadata = {k: v for k, v in lora.metadata.items() if k not in (DIFFUSERS_METADATA_KEY, FUSEDIT_METADATA_KEY)}
    metadata.setdefault("format", "pt")
    metadata[FUSEDIT_METADATA_KEY] = json.dumps(fusedit_metadata(lora, folded), sort_keys=True)
    if fmt in ("diffusers", "peft"):
        # ranks per module for diffusers/PEFT to build the adapter; alpha = rank everywhere after the fold
        config = peft_config_dict(lora)
        if fmt == "diffusers":
            config = {f"transformer.{k}": v for k, v in config.items()}
        metadata[DIFFUSERS_METADATA_KEY] = json.dumps(config, indent=2, sort_keys=True)
    return tensors, metadata
