"""Lightning checkpoints: written atomically, read with `weights_only=True`, found from a run directory.

A checkpoint holds the LoRA weights (EditLoRAModule.state_dict), optimizer and LR-scheduler state, loop
progress (global step), the data module's position and callback state: tensors and primitive types only, so
`torch.load(weights_only=True)` reads it and no pickled code is ever executed.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _load as pl_load
from lightning.pytorch.plugins.io import TorchCheckpointIO

from fusedit.errors import UserFileNotFoundError
from fusedit.io import atomic_write_path

CHECKPOINT_DIR = "checkpoints"
LAST = "last.ckpt"

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into a temp file, fsync, rename; torch.load only with weights_only=True."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        # Through a file object: torch's zip writer then raises the OSError (ENOSPC) itself, which atomic_write_path
        # reports naming the file, instead of "unexpected pos N vs M" from its own writer.
        with atomic_write_path(path) as tmp, open(tmp, "wb") as handle:
            torch.save(checkpoint, handle)

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict[str, Any]:
        if weights_only is False:
            raise ValueError("fusedit loads checkpoints with weights_only=True only")
        if not Path(path).is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        return pl_load(path, map_location=map_location or (lambda storage, loc: storage), weights_only=True)


def checkpoint_step(path: str | os.PathLike) -> int:
    """The global step a checkpoint was saved at. Memory-mapped: the weights and optimizer moments are not read.
    Raises whatever torch raises for a torn, empty or foreign file."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError("not a Lightning checkpoint (no 'state_dict')")
    return int(checkpoint.get("global_step", 0))


def newest_intact_checkpoint(run_dir: str | os.PathLike) -> tuple[Path, int] | None:
    """(checkpoint, global step) of the run dir's intact checkpoint with the highest step, or None if it has none.

    Candidates: `checkpoints/last.ckpt` (periodic and on-signal saves), `checkpoints/step-*.ckpt` (ModelCheckpoint's
    kept steps) and Lightning's `hpc_ckpt_N.ckpt` (its SLURM requeue handler). A file that cannot be read (0 bytes,
    torn by a full disk or a copy) is skipped with a warning naming it, so a damaged last.ckpt falls back to the
    step checkpoint beside it instead of ending the resume in a traceback.
    """
    run_dir = Path(run_dir)
    candidates = [
        run_dir / CHECKPOINT_DIR / LAST,
        *sorted((run_dir / CHECKPOINT_DIR).glob("*.ckpt")),
        *sorted(run_dir.glob("hpc_ckpt_*.ckpt")),
        run_dir / LAST,
    ]
    best: tuple[Path, int] | None = None
    damaged: list[str] = []
    for candidate in dict.fromkeys(candidates):
        if not candidate.is_file():
            continue
        try:
            step = checkpoint_step(candidate)
        except Exception as error:  # torch raises several types for a torn, empty or foreign file
            damaged.append(f"{candidate} ({type(error).__name__}: {str(error).splitlines()[0][:120]})")
            continue
        if best is None or step > best[1]:
            best = (candidate, step)
    for item in damaged:
        message = f"fusedit: warning: skipping unreadable checkpoint {item}"
        if best is not None:
            message += f"; continuing from {best[0]} (step {best[1]})"
        print(message, file=sys.stderr, flush=True)
        log.warning(message)
    return best


def resolve_checkpoint(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """(checkpoint file, run dir or None) for a `.ckpt` file or a run directory (its newest intact checkpoint)."""
    path = Path(path).expanduser()
    if path.is_dir():
        found = newest_intact_checkpoint(path)
        if found is None:
            raise UserFileNotFoundError(
                f"ckpt_path={path} is a directory without a readable {CHECKPOINT_DIR}/{LAST}: is it a fusedit run "
                "directory that saved a checkpoint (callbacks.model_checkpoint.every_n_train_steps)?"
            )
        path = found[0]
    if not path.is_file():
        raise UserFileNotFoundError(f"ckpt_path={path} does not exist")
    run_dir = path.parent.parent if path.parent.name == CHECKPOINT_DIR else None
    return path, run_dir


def auto_resume_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint a restarted job in an existing run dir continues from, or None for a fresh run dir.

    A requeued SLURM job (or a resubmitted submitit job) runs the same command again in the same run dir: it must
    continue, not start over and overwrite. The newest intact checkpoint wins (`newest_intact_checkpoint`).
    """
    found = newest_intact_checkpoint(run_dir)
    return found[0] if found else None
