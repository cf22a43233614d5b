"""`lora.init_from=PATH`: start training from an existing LoRA file (any layout and key style fusedit reads).

`read_init_lora` reads and checks the file against the config before the model loads (one-line errors naming the
file, the module and the setting to change); `fusedit.lora.adapter.add_lora(init_from=...)` then builds the adapter
with each file module's own rank and scale (PEFT `rank_pattern` / `alpha_pattern`) and copies its factors, so at
step 0 the model computes exactly what diffusers computes with that file loaded. Targeted modules the file lacks
keep their fresh initialisation (lora_B = 0 with `lora.init=default`: no change at step 0).
"""

from __future__ import annotations

import collections
import os
from pathlib import Path

from fusedit.convert import LoraWeights, convert_lora_layout, read_lora
from fusedit.convert.layout import DIRECTION_TO
from fusedit.errors import UserInputError, examples
from fusedit.lora.targets import resolve_targets


def _targeted(module: str, target_modules: list[str]) -> bool:
    # PEFT's suffix rule for a plain target name: the module path ends in it at a `.` boundary
    return any(module == t or module.endswith("." + t) for t in target_modules)


def read_init_lora(path: str | os.PathLike, rank: int, targets, layout: str, family: str | None = None) -> LoraWeights:
    """The LoRA at `path` in `layout`, checked against `lora.rank` / `lora.targets` (the target names of `family`,
    as `resolve_targets` reads them: "qwen-image-2.1", or the MMDiT's). Raises UserInputError (one line).

    The file's most common rank, in the standard layout (how `lora.rank` is counted), must equal `rank`: the memory
    estimate and the run's record use it. Other per-module ranks and every module's scale are taken from the file.
    """
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"lora.init_from={path} does not exist")
    weights = read_lora(path)
    if weights.adapter_type == "dora":  # its factors alone are not the adapter it holds
        raise UserInputError(
            f"lora.init_from={path} is a DoRA LoRA: a LoRA run would start from its factors without the magnitudes, "
            "and lora.type=dora starts its magnitudes from the base weight; continue it with ckpt_path instead"
        )
    standard = convert_lora_layout(weights, DIRECTION_TO["standard"])
    file_rank = collections.Counter(mod.rank for mod in standard.modules.values()).most_common(1)[0][0]
    if file_rank != rank:
        raise UserInputError(
            f"lora.init_from={path} has rank {file_rank}, but lora.rank={rank}: set lora.rank={file_rank} to continue "
            "from it"
        )
    converted = convert_lora_layout(weights, DIRECTION_TO[layout])
    target_modules = resolve_targets(targets, layout, family)
    untargeted = [m for m in converted.modules if not _targeted(m, target_modules)]
    if untargeted:
        raise UserInputError(
            f"lora.init_from={path} has modules lora.targets does not train: {examples(untargeted, 3)}; "
            "add them to lora.targets (e.g. lora=full)"
        )
    return converted
