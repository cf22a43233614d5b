"""A run directory's ownership and its recorded config: one process trains in a run dir at a time, and a run dir
continues only with the settings its checkpoints were trained with.

Two `train.py` processes in one run dir (the same FUSEDIT_RUN_NAME, or a run resumed while it still trains) would
interleave checkpoints, LoRA exports and config files of two different runs. `RunDirLock` is an exclusive
`flock` on `<run dir>/.fusedit.lock`: the kernel drops it when the process ends, however it ends, so a crashed
or killed run never leaves it stuck. `RUN_CONFIG` is the config the run's checkpoints were trained with (Hydra
rewrites `.hydra/config.yaml` at every start in the same dir, so it cannot be that record).
"""

from __future__ import annotations

import datetime
import fcntl
import os
import socket
import tempfile
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fusedit.errors import UserInputError

LOCK_FILE = ".fusedit.lock"
RUN_CONFIG = "run_config.yaml"
# Keys (and their subkeys) that differ between two invocations of the same run without changing what is trained:
# a resume sets paths.output_dir to the run dir where the original command has Hydra's ${hydra:runtime.output_dir}.
SAME_RUN_KEYS = ("ckpt_path", "auto_resume", "accept_config_changes", "paths.output_dir")
# Process-rank variables of Lightning's launchers, torchrun and SLURM: a run's other ranks share rank 0's run dir.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")


def is_first_process() -> bool:
    """True for the process that owns the run dir (global rank 0), before Lightning has set the ranks up."""
    return all(os.environ.get(name, "0") in ("", "0") for name in RANK_VARIABLES)


class RunDirLock:
    """Hold `<run_dir>/.fusedit.lock` (exclusive flock) while a run trains; a context manager.

    Raises UserInputError, naming the run dir and the holder (pid, host, start time), when another live process
    holds it. Only the first process of a run takes it (`is_first_process`); the others share the dir.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> RunDirLock:
        if not is_first_process():
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserInputError(
                f"run dir {self.path.parent} is in use by {holder}: one run trains in a run dir at a time. Wait for "
                "it to end, or start this run in its own dir (another FUSEDIT_RUN_NAME)"
            ) from None
        started = datetime.datetime.now().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} (started {started})\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def check_writable(directories: dict[str, str | os.PathLike]) -> None:
    """Write a probe file in each directory, or in its nearest existing parent when it does not exist yet (it is
    created there later); UserInputError naming the setting and the reason.

    Found at start, not at the first LoRA export or checkpoint (step 500 by default). A probe file, not
    os.access: access() says yes to root on a read-only mount. Nothing is created: a callback that never writes
    (e.g. validation images off) leaves no empty folder behind.
    """
    for setting, directory in directories.items():
        existing = Path(directory).absolute()
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        try:
            if not existing.is_dir():
                raise NotADirectoryError(20, "not a directory", str(existing))
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as error:
            raise UserInputError(f"{setting}={directory}: cannot write there ({error.strerror or error})") from None


def config_differences(old: DictConfig, new: DictConfig, ignore=SAME_RUN_KEYS) -> list[str]:
    """`key: old -> new` for every leaf that differs (interpolations compared as written, not resolved)."""

    def leaves(container, prefix=""):
        if isinstance(container, dict):
            for key, value in container.items():
                yield from leaves(value, f"{prefix}.{key}" if prefix else str(key))
        else:
            yield prefix, container

    before = dict(leaves(OmegaConf.to_container(old, resolve=False)))
    after = dict(leaves(OmegaConf.to_container(new, resolve=False)))
    return [
        f"{key}: {before.get(key, '(absent)')!r} -> {after.get(key, '(absent)')!r}"
        for key in sorted(set(before) | set(after))
        if not any(key == skip or key.startswith(skip + ".") for skip in ignore)
        and before.get(key, "(absent)") != after.get(key, "(absent)")
    ]


def check_same_run(run_dir: Path, cfg: DictConfig) -> None:
    """Refuse to continue `run_dir`'s checkpoint with settings other than those it was trained with.

    A FUSEDIT_RUN_NAME reused for another experiment would otherwise "continue" the old run: zero new steps, the
    old LoRA, the new settings recorded against it. `accept_config_changes=true` continues with the new settings.
    """
    recorded = run_dir / RUN_CONFIG
    if not recorded.is_file() or cfg.get("accept_config_changes", False):
        return
    changes = config_differences(OmegaConf.load(recorded), cfg)
    if changes:
        shown = "\n  ".join(changes[:20]) + (f"\n  (and {len(changes) - 20} more)" if len(changes) > 20 else "")
        raise UserInputError(
            f"run dir {run_dir} holds a run trained with other settings ({recorded}); continuing it would mix two "
            f"runs. Differences:\n  {shown}\nStart a new run dir (another FUSEDIT_RUN_NAME), resume it with "
            f"ckpt_path={run_dir} (its own settings plus your overrides), or pass accept_config_changes=true"
        )


def resume_hydra_overrides(argv: list[str]) -> list[str]:
    """Hydra overrides that make `python train.py ckpt_path=<run dir>` log into the run it continues.

    Without them Hydra makes a fresh `outputs/train/runs/<time>/` for the resuming process (its `.hydra/` and log
    file) although the run continues in its own dir. The resume's own `.hydra/` files go to
    `<run dir>/.hydra/resume-<time>/`, so the run's original `.hydra/overrides.yaml` (what `resume_config` composes
    from) is kept. Returns [] when `argv` resumes nothing, is a multirun, or sets hydra.run.dir itself.
    """
    if any(arg in ("-m", "--multirun") or arg.startswith(("hydra.run.dir=", "hydra.output_subdir=")) for arg in argv):
        return []
    values = [arg.split("=", 1)[1] for arg in argv if arg.startswith(("ckpt_path=", "+ckpt_path=", "++ckpt_path="))]
    if not values or values[-1] in ("", "null"):
        return []
    path = Path(values[-1].strip("'\"")).expanduser()
    if path.is_file() and path.parent.name == "checkpoints":
        path = path.parent.parent
    if not (path.is_dir() and (path / "checkpoints").is_dir()):
        return []  # not a run dir: resolve_checkpoint reports the problem
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
    quoted = "'" + str(path.resolve()).replace("\\", "\\\\").replace("'", "\\'") + "'"
    return [f"hydra.run.dir={quoted}", f"hydra.output_subdir=.hydra/resume-{stamp}"]
