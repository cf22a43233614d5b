"""Callbacks the reliability tests plug into real runs (also into `python train.py` via `+callbacks.x=...`)."""

from __future__ import annotations

import time

import torch
from lightning.pytorch import Callback


class Sleep(Callback):
    """Slow every step down so a test can signal a subprocess between two steps."""

    def __init__(self, seconds: float = 0.2):
        self.seconds = float(seconds)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.seconds:
            time.sleep(self.seconds)


class PoisonGradients(Callback):
    """Write NaN into every LoRA gradient at the given (1-based) optimizer steps."""

    def __init__(self, steps, value: float = float("nan")):
        self.steps = set(steps)
        self.value = value

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step + 1 in self.steps:
            for parameter in pl_module.parameters():
                if parameter.grad is not None:
                    parameter.grad.fill_(self.value)


class SendSignal(Callback):
    """Send `signum` to this process while the given (1-based) step runs (in-process signal tests)."""

    def __init__(self, step: int, signum: int, at_step_end: bool = False):
        self.step, self.signum, self.at_step_end = step, signum, at_step_end

    def _send(self, step: int) -> None:
        import os

        if step == self.step:
            os.kill(os.getpid(), self.signum)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self.at_step_end:
            self._send(trainer.global_step + 1)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # Registered after GracefulStop, so this lands after its check and before Lightning's end-of-step one.
        if self.at_step_end:
            self._send(trainer.global_step)


def lora_tensors(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))
