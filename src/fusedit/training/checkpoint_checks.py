"""Refuse a checkpoint that cannot continue this run, before `fit` starts, naming the offending tensors.

A checkpoint from another model (other hidden size or block count), other LoRA settings (rank, targets, layout)
or one that already holds NaN/inf (saved after a fault, or damaged) would otherwise fail inside Lightning's restore
with a bare shape error, or worse, load and train on from garbage. `check_checkpoint_file` compares the file's
LoRA tensors with the model's (names and shapes) and scans weights and optimizer moments for non-finite values.
The file is memory-mapped, so this costs little even for a large LoRA.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from fusedit.errors import UserInputError, examples

SHOW = 8
OTHER_RUN_HINT = (
    "\nWas it saved by a run with another model (model.path, model.layout) or other LoRA settings "
    "(lora.rank, lora.targets)? Resume with the run's own settings: ckpt_path=<run dir>."
)


class CheckpointError(UserInputError):
    """The checkpoint does not fit this model or holds non-finite values; the message names the keys."""


def nonfinite_tensors(tensors: Mapping[str, object], prefix: str = "") -> list[str]:
    """`name (k NaN, j inf)` for every floating tensor in a nested dict/list that holds NaN or inf."""
    found: list[str] = []

    def visit(value, name: str) -> None:
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and value.numel():
                finite = torch.isfinite(value)
                if not bool(finite.all()):
                    nans = int(torch.isnan(value).sum())
                    found.append(f"{name} ({nans} NaN, {int((~finite).sum()) - nans} inf of {value.numel()})")
        elif isinstance(value, Mapping):
            for key, item in value.items():
                visit(item, f"{name}.{key}" if name else str(key))
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                visit(item, f"{name}[{index}]")

    visit(tensors, prefix)
    return found


def check_state_dict(
    state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], what: str, hint: str = ""
) -> None:
    """Raise CheckpointError unless `state_dict` has exactly the keys and shapes of `expected`, all finite."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = [
        f"{key}: file {list(state_dict[key].shape)}, model {list(expected[key])}"
        for key in sorted(set(state_dict) & set(expected))
        if tuple(state_dict[key].shape) != tuple(expected[key])
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} LoRA tensors of the model are missing: {examples(missing, SHOW, sort=False)}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors the model does not have: {examples(unexpected, SHOW, sort=False)}")
    if shapes:
        problems.append(f"{len(shapes)} tensors have the wrong shape: {examples(shapes, SHOW, sort=False)}")
    if problems:
        raise CheckpointError(f"{what} does not fit this model:\n  " + "\n  ".join(problems) + hint)
    bad = nonfinite_tensors(state_dict)
    if bad:
        raise CheckpointError(f"{what} holds non-finite weights: {examples(bad, SHOW, sort=False)}")


def check_checkpoint_file(path: str | Path, module: torch.nn.Module) -> None:
    """Refuse `path` (a Lightning checkpoint) unless it can resume training `module` (its `state_dict()` keys)."""
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises several types for a torn, foreign or pickled-code file
        raise CheckpointError(f"checkpoint {path} cannot be read with weights_only=True: {error}") from None
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        raise CheckpointError(f"checkpoint {path} is not a Lightning checkpoint (no 'state_dict')")
    expected = {name: tensor.shape for name, tensor in module.state_dict().items()}
    check_state_dict(checkpoint["state_dict"], expected, f"checkpoint {path}", OTHER_RUN_HINT)
    bad = nonfinite_tensors(checkpoint.get("optimizer_states") or [], "optimizer_states")
    if bad:
        raise CheckpointError(f"checkpoint {path} holds non-finite optimizer state: {examples(bad, SHOW, sort=False)}")
