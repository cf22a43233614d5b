"""Load one or several LoRAs, in any format and either QKV layout, onto the transformer being used.

Every file goes through `fusedit.convert.read_lora` (diffusers/PEFT, DiffSynth, ComfyUI, kohya/musubi; the alpha
convention of each resolved to one alpha per module) and `convert_lora_layout` (exact standard <-> merged
conversion), then into diffusers' own `load_lora_adapter` with a LoraConfig that carries each module's rank and
alpha. The adapters are activated with diffusers' `set_adapters`, so the effective update of a module is

    user scale x (alpha / rank) x B·A

and the default user scale 1.0 reproduces exactly what training optimised (PEFT scales by alpha / rank during
training). Nobody has to know or guess the alpha a file was trained with.

LoKr / LoHa files (ComfyUI's / LyCORIS' keys, as `lora.type=lokr|loha` exports them) are applied with `lora.fuse=true`
only: each module's dense update, user scale x ComfyUI's alpha rule x the factors' product
(`fusedit.lora.lycoris.read_lycoris` / `lycoris_delta`, the one decoding home), is added to the base weight in
fp32 and rounded once, on either layout (a q/k/v or gate/up update goes to its row block of the merged module, a
merged module's update is split by rows on the standard layout). PEFT's LoKr / LoHa layers cannot hold these files
as adapters: PEFT derives each factor's shape from the Linear's size and one `decompose_factor` per config, and an
exported q/k/v LoKr keeps the merged to_qkv's factorisation. Without `lora.fuse` they are refused in one line
(the preflight does it before the pipeline loads).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from fusedit.convert import TO_MERGED, TO_STANDARD, LoraWeights, convert_lora_layout, read_lora
from fusedit.convert.lora_formats import peft_adapter
from fusedit.errors import UserInputError, examples
from fusedit.inference.inputs import unique_name
from fusedit.inference.preflight import LoraSpec, lora_file, lora_specs, lycoris_file_type, lycoris_needs_fuse
from fusedit.model import is_merged

# LoraSpec / lora_specs live in the preflight (checked before torch is imported) and are offered here too.
__all__ = ["LoraSpec", "load_loras", "lora_specs", "peft_adapter"]


def _adapter_name(spec: LoraSpec, taken: set[str]) -> str:
    return unique_name(spec.name or re.sub(r"[^A-Za-z0-9_]", "_", Path(spec.path).stem) or "lora", taken)


def load_loras(transformer: nn.Module, specs: list[LoraSpec], fuse: bool = False) -> list[dict]:
    """Attach every LoRA of `specs` to `transformer` (merged or standard layout) and activate them with their scales.

    Returns one record per LoRA (what was read and how it was applied) for the run's JSON record. With `fuse` the
    scaled updates are merged into the base weights (no per-step LoRA GEMMs; the adapters cannot be re-weighted).
    """
    if not specs:
        return []
    target_layout = "merged_qkv" if is_merged(transformer) else "standard"
    direction = TO_MERGED if target_layout == "merged_qkv" else TO_STANDARD
    records, names, taken, loras = [], [], set(), []
    for spec in specs:
        path = lora_file(spec)  # checked by the preflight too; callers of load_loras alone get the same message
        if lycoris_file_type(path) is None:
            loras.append((spec, path))
            continue
        if not fuse:
            raise UserInputError(lycoris_needs_fuse(spec.key, path))
        records.append(_fuse_lycoris(transformer, spec, path, target_layout, _adapter_name(spec, taken)))
    for spec, path in loras:
        name = _adapter_name(spec, taken)
        records.append(_attach_lora(transformer, spec, path, target_layout, direction, name))
        names.append(name)
    if not names:
        return records
    transformer.set_adapters(names, weights=[spec.scale for spec, _ in loras])
    if fuse:
        transformer.fuse_lora(adapter_names=names)
    return records


def _attach_lora(transformer: nn.Module, spec: LoraSpec, path: Path, target_layout: str, direction, name: str) -> dict:
    """Load the LoRA file at `path` into `transformer` as PEFT adapter `name`, converted exactly to `target_layout`;
    its run record. Raises UserInputError when its modules are missing from the model or do not fit it."""
    weights = read_lora(path)
    source_layout = weights.layout
    converted = convert_lora_layout(weights, direction)
    state_dict, config = peft_adapter(converted)
    missing = [m for m in converted.modules if not _has_module(transformer, m)]
    if missing:
        raise UserInputError(
            f"LoRA {path} targets modules the {target_layout} transformer does not have: "
            f"{examples(missing, sort=False)} — is it a LoRA for a different model?"
        )
    mismatched = _shape_mismatches(transformer, converted)
    if mismatched:
        raise UserInputError(
            f"LoRA {path} does not fit the {target_layout} transformer (another hidden size?): "
            + examples(mismatched, sort=False)
        )
    transformer.load_lora_adapter(state_dict, prefix=None, adapter_name=name, metadata=config)
    scales = sorted({m.scale for m in converted.modules.values()})
    return {
        "path": str(path),
        "name": name,
        "format": weights.format,
        "adapter_type": weights.adapter_type,  # "dora": magnitudes applied too (docs/conversion.md)
        "layout": source_layout,
        "applied_layout": target_layout,
        "modules": len(converted.modules),
        "rank": config["r"],
        "alpha": config["lora_alpha"],
        "alpha_over_rank": scales if len(scales) > 1 else scales[0],
        "scale": spec.scale,
    }


def _fuse_lycoris(transformer: nn.Module, spec: LoraSpec, path: Path, target_layout: str, name: str) -> dict:
    """Add `spec.scale` x the LoKr / LoHa file's update to the weights (fp32 sum, one rounding); its run record."""
    from fusedit.io import load_safetensors
    from fusedit.lora.lycoris import MERGED_GROUPS, lycoris_delta, read_lycoris

    modules = read_lycoris(load_safetensors(path)[0], str(path))
    updates, problems = {}, []  # target module -> [(first row, update)]
    part_of = {part: (merged, index) for merged, parts in MERGED_GROUPS.items() for index, part in enumerate(parts)}
    for module, (factors, file_scale) in modules.items():
        delta = lycoris_delta(factors, spec.scale * file_scale)
        prefix, _, leaf = module.rpartition(".")
        if _has_weight(transformer, module):
            updates.setdefault(module, []).append((0, delta))
        elif leaf in part_of and _has_weight(transformer, f"{prefix}.{part_of[leaf][0]}"):  # q/k/v -> merged rows
            merged, index = part_of[leaf]
            part_rows = _base_layer(transformer, f"{prefix}.{merged}").weight.shape[0] // len(MERGED_GROUPS[merged])
            if delta.shape[0] != part_rows:
                problems.append(f"{module}: {delta.shape[0]} rows vs {part_rows} per part of {prefix}.{merged}")
            updates.setdefault(f"{prefix}.{merged}", []).append((index * part_rows, delta))
        elif leaf in MERGED_GROUPS and all(_has_weight(transformer, f"{prefix}.{p}") for p in MERGED_GROUPS[leaf]):
            for part, rows in zip(MERGED_GROUPS[leaf], delta.chunk(len(MERGED_GROUPS[leaf])), strict=True):
                updates.setdefault(f"{prefix}.{part}", []).append((0, rows))
        else:
            raise UserInputError(
                f"{spec.key}={path} targets {module}, which the {target_layout} transformer does not have — is it "
                "an adapter for a different model?"
            )
    for module, blocks in updates.items():
        weight = _base_layer(transformer, module).weight
        problems += [
            f"{module}: rows {start}..{start + delta.shape[0]} x {delta.shape[1]} vs weight {list(weight.shape)}"
            for start, delta in blocks
            if start + delta.shape[0] > weight.shape[0] or delta.shape[1] != weight.shape[1]
        ]
    if problems:
        raise UserInputError(
            f"{spec.key}={path} does not fit the {target_layout} transformer (another hidden size?): "
            + examples(problems, sort=False)
        )
    with torch.no_grad():
        for module, blocks in updates.items():
            weight = _base_layer(transformer, module).weight
            summed = weight.float()
            for start, delta in blocks:
                summed[start : start + delta.shape[0]] += delta.to(weight.device)
            weight.copy_(summed.to(weight.dtype))
    file_scales = sorted({file_scale for _, file_scale in modules.values()})
    return {
        "path": str(path),
        "name": name,
        "format": "comfyui",
        "adapter_type": lycoris_file_type(path).lower(),
        "layout": "standard" if not any(m.rpartition(".")[2] in MERGED_GROUPS for m in modules) else "merged_qkv",
        "applied_layout": target_layout,
        "applied": "fused: the dense update added to the base weights",
        "modules": len(modules),
        "file_scale": file_scales if len(file_scales) > 1 else file_scales[0],  # ComfyUI's alpha rule
        "scale": spec.scale,
    }


def _has_weight(model: nn.Module, name: str) -> bool:
    """A layer with a weight under `name` (not a merged model's `MergedPart` placeholder for q/k/v)."""
    return _has_module(model, name) and hasattr(_base_layer(model, name), "weight")


def _base_layer(model: nn.Module, name: str) -> nn.Module:
    layer = model.get_submodule(name)
    return getattr(layer, "base_layer", layer)  # wrapped by a LoRA adapter


def _shape_mismatches(model: nn.Module, weights: LoraWeights) -> list[str]:
    """`module: A [r, in] / B [out, r] vs Linear in -> out` for every LoRA module whose sizes the model's lack."""
    found = []
    for module, mod in weights.modules.items():
        layer = model.get_submodule(module)
        layer = getattr(layer, "base_layer", layer)  # already wrapped by an earlier adapter
        in_features, out_features = getattr(layer, "in_features", None), getattr(layer, "out_features", None)
        if (in_features, out_features) != (mod.A.shape[1], mod.B.shape[0]):
            found.append(
                f"{module}: lora_A {list(mod.A.shape)} / lora_B {list(mod.B.shape)} vs Linear "
                f"{in_features} -> {out_features}"
            )
    return found


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True
