"""Lightning checkpoints: written atomically, read with `weights_only=True`, found from a run directory.

A checkpoint holds the LoRA weights (EditLoRAModule.state_dict), optimizer and LR-scheduler state, loop
progress (global step), the data module's position and callback state: tensors and primitive types only, so
`torch.load(weights_only=True)` reads it and no pickled code is ever executed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _load as pl_load
from lightning.pytorch.plugins.io import TorchCheckpointIO

from fusedit.errors import UserFileNotFoundError
from fusedit.io import atomic_write_path

CHECKPOINT_DIR = "checkpoints"
LAST = "last.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into a temp file, fsync, rename; torch.load only with weights_only=True."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        with atomic_write_path(path) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict[str, Any]:
        if weights_only is False:
            raise ValueError("fusedit loads checkpoints with weights_only=True only")
        if not Path(path).is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        return pl_load(path, map_location=map_location or (lambda storage, loc: storage), weights_only=True)


def resolve_checkpoint(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """(checkpoint file, run dir or None) for a `.ckpt` file or a run directory (its checkpoints/last.ckpt)."""
    path = Path(path).expanduser()
    if path.is_dir():
        candidates = [path / CHECKPOINT_DIR / LAST, path / LAST]
        found = [candidate for candidate in candidates if candidate.is_file()]
        if not found:
            raise UserFileNotFoundError(
                f"ckpt_path={path} is a directory without {CHECKPOINT_DIR}/{LAST}: is it a fusedit run directory "
                "that saved a checkpoint (callbacks.model_checkpoint.every_n_train_steps)?"
            )
        path = found[0]
    if not path.is_file():
        raise UserFileNotFoundError(f"ckpt_path={path} does not exist")
    run_dir = path.parent.parent if path.parent.name == CHECKPOINT_DIR else None
    return path, run_dir


def auto_resume_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint a restarted job in an existing run dir continues from, or None for a fresh run dir.

    A requeued SLURM job (or a resubmitted submitit job) runs the same command again in the same run dir: it must
    continue, not start over and overwrite. Candidates are `checkpoints/last.ckpt` (periodic and on-signal saves) and
    Lightning's `hpc_ckpt_N.ckpt` (saved by its SLURM requeue handler); the one with the highest global step wins.
    """
    run_dir = Path(run_dir)
    candidates = [run_dir / CHECKPOINT_DIR / LAST, *sorted(run_dir.glob("hpc_ckpt_*.ckpt"))]
    best, best_step = None, -1
    for candidate in candidates:
        if not candidate.is_file():
            continue
        # Memory-mapped: only the step is read here, not the weights and optimizer moments.
        step = int(torch.load(candidate, map_location="cpu", weights_only=True, mmap=True).get("global_step", 0))
        if step > best_step:
            best, best_step = candidate, step
    return best
