"""EMA of the LoRA weights (`callbacks=ema`): torch's `AveragedModel` with `get_ema_multi_avg_fn`, over the trainable
LoRA parameters only, and the weights a user of the LoRA gets at any moment (`user_weights`).

Why not Lightning's `WeightAveraging` callback: it deep-copies the whole LightningModule (the frozen 20B base and the
text encoder with it) into its `AveragedModel`, and at the end of training overwrites the trained weights with the
average. Here the average is a copy of the LoRA factors alone (4 bytes per LoRA parameter), the raw weights stay
what was trained (`lora/final.safetensors`) and the average is exported beside them (`lora/final-ema.safetensors`,
fusedit.training.callbacks.LoRAExport), through the same export.

The update after optimizer step k (torch.optim.swa_utils.get_ema_multi_avg_fn): ema_1 = w_1, then
ema_k = decay * ema_{k-1} + (1 - decay) * w_k (a foreach lerp). Validation images, the validation loss and the EMA
export use the average; checkpoints hold it (callback state) and a resumed run continues it exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from fusedit.optim import evaluation_mode


class LoRAEMA(Callback):
    """Exponential moving average of the LoRA parameters, updated after every `every_n_steps`-th optimizer step.

    decay: in [0, 1); the weight of the previous average (0.999 averages over ~1000 steps). The average lives on the
    LoRA's device, in its dtype. Not with sharded training (trainer=fsdp): each rank would average its own shard.
    """

    def __init__(self, decay: float = 0.999, every_n_steps: int = 1):
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"callbacks.ema.decay must be in [0, 1), got {decay}")
        if int(every_n_steps) < 1:
            raise ValueError(f"callbacks.ema.every_n_steps must be >= 1, got {every_n_steps}")
        self.decay = float(decay)
        self.every_n_steps = int(every_n_steps)
        self.average: AveragedModel | None = None
        self._names: list[str] = []
        self._live: nn.ParameterList | None = None
        self._last_update_step = 0
        self._pending_state: dict | None = None
        self._validation = contextlib.ExitStack()

    # -- the average -------------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # After the strategy moved the module: the average is created where the LoRA lives.
        parameters = pl_module.trainable_parameters()
        self._names = list(parameters)
        # The live parameters themselves (not copies): AveragedModel reads them on every update.
        self._live = nn.ParameterList(parameters.values())
        self.average = AveragedModel(
            self._live, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=False
        ).requires_grad_(False)
        if self._pending_state is not None:
            self._load(self._pending_state)
            self._pending_state = None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step  # optimizer steps so far: unchanged on the non-final batches of an accumulation
        if step > self._last_update_step and step % self.every_n_steps == 0:
            self.average.update_parameters(self._live)
            self._last_update_step = step

    def averaged_parameters(self) -> dict[str, torch.Tensor]:
        """Module parameter name -> its average (the LightningModule's names, as in its state_dict)."""
        if self.average is None:
            raise RuntimeError("the EMA starts with fit")
        return dict(zip(self._names, self.average.module.parameters(), strict=True))

    @contextlib.contextmanager
    def applied(self, pl_module: LightningModule) -> Iterator[None]:
        """The module's LoRA holds the average inside (before the first update: the weights as they are)."""
        if self.average is None or int(self.average.n_averaged) == 0:
            yield
            return
        parameters = pl_module.trainable_parameters()
        saved = {name: parameters[name].detach().clone() for name in self._names}
        with torch.no_grad():
            for name, value in self.averaged_parameters().items():
                parameters[name].copy_(value)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    parameters[name].copy_(value)

    # -- validation loss on the average (as Lightning's WeightAveraging does) ---------------------------------------
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._validation.enter_context(self.applied(pl_module))

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._validation.close()

    # -- checkpoints: the average and its count, as plain tensors (weights_only=True loads them) -------------------
    def state_dict(self) -> dict:
        if self.average is None:
            return {}
        return {
            "names": list(self._names),
            "average": {name: value.detach().clone() for name, value in self.averaged_parameters().items()},
            "n_averaged": self.average.n_averaged.detach().clone(),
            "last_update_step": self._last_update_step,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict:
            return
        if self.average is None:  # restored before fit starts (the usual order): applied in on_fit_start
            self._pending_state = state_dict
        else:  # strategies that restore after setup
            self._load(state_dict)

    def _load(self, state_dict: dict) -> None:
        if list(state_dict["names"]) != self._names:
            raise ValueError("the checkpoint's EMA averages other LoRA parameters than this run trains")
        with torch.no_grad():
            for name, value in self.averaged_parameters().items():
                value.copy_(state_dict["average"][name])
            self.average.n_averaged.copy_(state_dict["n_averaged"])
        self._last_update_step = int(state_dict["last_update_step"])


def find_ema(trainer: Trainer | None) -> LoRAEMA | None:
    """The run's EMA callback, if averaging is on."""
    callbacks = trainer.callbacks if trainer is not None else []
    return next((callback for callback in callbacks if isinstance(callback, LoRAEMA)), None)


@contextlib.contextmanager
def user_weights(pl_module: LightningModule, ema: bool = True) -> Iterator[None]:
    """The LoRA a user of the training gets now, in place inside: the EMA average when averaging is on (and `ema`),
    and a schedule-free optimizer's averaged point x (fusedit.optim.evaluation_mode)."""
    trainer = pl_module._trainer
    averaging = find_ema(trainer) if ema else None
    optimizers = trainer.optimizers if trainer is not None else []
    with evaluation_mode(optimizers), averaging.applied(pl_module) if averaging else contextlib.nullcontext():
        yield
