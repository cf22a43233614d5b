"""Stop cleanly on SIGTERM / SIGINT / SLURM preemption: finish the step, save a checkpoint, exit.

This callback installs its own SIGTERM and SIGINT handlers at train start (over Lightning's SIGTERM one). The
first signal only records the request, and forwards it to processes Lightning launched (DDP on local devices);
a second one aborts at once. Lightning's own SIGTERM stop happens later in the step than `on_train_batch_end`, so
a signal landing between the two would end the run without a step-aligned checkpoint: with one handler there is
one place where a run stops. SLURM's requeue signal (SIGUSR1, `SLURMEnvironment(auto_requeue=True)`) stays
Lightning's: it saves an HPC checkpoint and requeues the job.

The request is acted on at the end of a training step (`on_train_batch_end`, the point where ModelCheckpoint's
periodic checkpoints are taken and from which a resume is exact), reduced over all ranks so every rank saves the
same step: `checkpoints/last.ckpt` is written and Lightning's `SIGTERMException` ends `fit`. `train()` reports the
stop and the resume command; `python train.py` then exits with 128 + the signal number (143 for SIGTERM, 130 for
SIGINT), so schedulers and shell scripts see an interrupted run, not a finished one.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from fusedit.training.checkpoint import CHECKPOINT_DIR, LAST

log = logging.getLogger(__name__)


class GracefulStop(Callback):
    def __init__(self, handle_sigint: bool = True):
        self.handle_sigint = bool(handle_sigint)
        self.requested: str | None = None  # the signal that asked us to stop (our own handler)
        self.stopped_by: str | None = None
        self.step: int | None = None
        self.checkpoint: Path | None = None
        self._previous: dict = {}
        self._trainer: Trainer | None = None

    # -- signal handling ---------------------------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        if self.requested is not None:  # a second signal: the user (or scheduler) does not want to wait
            self._restore()
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        launcher = self._trainer.strategy.launcher if self._trainer is not None else None
        if launcher is not None:
            launcher.kill(signum)  # processes Lightning launched (DDP on local devices) stop at the same step
        log.warning("%s received: stopping after this step with a checkpoint (send it again to abort)", self.requested)

    def _restore(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
        self._previous = {}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Installed after Lightning's own SIGTERM handler, on purpose: Lightning would also stop at its own check
        # point, later in the step than `on_train_batch_end`, and a signal landing between the two would end the
        # run without this callback's step-aligned checkpoint. One handler, one place where the stop happens.
        self._trainer = trainer
        if threading.current_thread() is threading.main_thread():
            signals = [signal.SIGTERM] + ([signal.SIGINT] if self.handle_sigint else [])
            self._previous = {signum: signal.signal(signum, self._on_signal) for signum in signals}

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._restore()
        self._trainer = None

    # -- acting on a request ---------------------------------------------------------------------------------------
    def _checkpoint_path(self, trainer: Trainer) -> Path:
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath:
                return Path(callback.dirpath) / LAST
        return Path(trainer.default_root_dir) / CHECKPOINT_DIR / LAST

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        local = self.requested is not None or trainer.received_sigterm
        if not trainer.strategy.reduce_boolean_decision(local, all=False):
            return
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            return  # the last step: the run ends now anyway, as a finished run (final LoRA written)
        self.stopped_by = self.requested or "SIGTERM"
        self.step = trainer.global_step
        self.checkpoint = self._checkpoint_path(trainer)
        trainer.save_checkpoint(self.checkpoint)
        log.warning("%s: checkpoint of step %d saved to %s; stopping", self.stopped_by, self.step, self.checkpoint)
        connector = getattr(trainer, "_signal_connector", None)
        if connector is None:
            raise SIGTERMException
        # Stop through Lightning's own SIGTERM flag (the one its handler, replaced by ours, would have set): the
        # loop then ends the step as usual, logging this step's metrics and flushing the loggers, and raises
        # SIGTERMException right after. Raising here would lose the step's metrics (they are logged after this
        # hook): every completed step must be logged exactly once across a stop and its resume.
        connector.received_sigterm = True

    @property
    def exit_code(self) -> int | None:
        return 128 + signal.Signals[self.stopped_by].value if self.stopped_by else None
