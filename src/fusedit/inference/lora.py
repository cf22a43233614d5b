"""Load one or several LoRAs, in any format and either QKV layout, onto the transformer being used.

Every file goes through `fusedit.convert.read_lora` (diffusers/PEFT, DiffSynth, ComfyUI, kohya/musubi; the alpha
convention of each resolved to one alpha per module) and `convert_lora_layout` (exact standard <-> merged
conversion), then into diffusers' own `load_lora_adapter` with a LoraConfig that carries each module's rank and
alpha. The adapters are activated with diffusers' `set_adapters`, so the effective update of a module is

    user scale x (alpha / rank) x B·A

and the default user scale 1.0 reproduces exactly what training optimised (PEFT scales by alpha / rank during
training). Nobody has to know or guess the alpha a file was trained with.
"""

from __future__ import annotations

import re
from pathlib import Path

from torch import nn

from fusedit.convert import TO_MERGED, TO_STANDARD, LoraWeights, convert_lora_layout, read_lora
from fusedit.convert.lora_formats import peft_adapter
from fusedit.errors import UserInputError, examples
from fusedit.inference.inputs import unique_name
from fusedit.inference.preflight import LoraSpec, lora_file, lora_specs
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
    records, names, taken = [], [], set()
    for spec in specs:
        path = lora_file(spec)  # checked by the preflight too; callers of load_loras alone get the same message
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
        name = _adapter_name(spec, taken)
        transformer.load_lora_adapter(state_dict, prefix=None, adapter_name=name, metadata=config)
        names.append(name)
        scales = sorted({m.scale for m in converted.modules.values()})
        records.append(
            {
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
        )
    transformer.set_adapters(names, weights=[spec.scale for spec in specs])
    if fuse:
        transformer.fuse_lora(adapter_names=names)
    return records


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
