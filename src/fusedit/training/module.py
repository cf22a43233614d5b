"""The LightningModule: LoRA on the Qwen-Image-Edit transformer, trained with the rectified-flow objective.

The module owns three things: the transformer carrying the LoRA (the only trainable parameters), the frozen
conditioner (VAE + text encoder, fusedit.step.conditioning) and the loss (fusedit.step.loss, which the benchmark
times as well). Checkpoints hold the LoRA weights only (`state_dict` is restricted to the trainable set) plus
Lightning's optimizer/scheduler/loop state, never the frozen 20B base.

Randomness per step (noise levels and noise) comes from generators seeded per sample by (seed, global step,
dataset row); see fusedit.step.loss.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable

import torch
from lightning.pytorch import LightningModule
from torch import nn

from fusedit.lora.adapter import lora_parameters
from fusedit.optim import evaluation_mode, set_train_mode
from fusedit.step.conditioning import EditConditioner, EditInputs
from fusedit.step.loss import EditLoss, dropped_captions
from fusedit.step.objective import FlowMatchObjective
from fusedit.training.checkpoint_checks import OTHER_RUN_HINT, check_state_dict

SCHEDULES = ("constant", "linear", "cosine")


def warmup_schedule(
    optimizer: torch.optim.Optimizer,
    name: str = "cosine",
    warmup_steps: int = 0,
    total_steps: int | None = None,
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over `warmup_steps`, then constant / linear decay / cosine decay to `min_lr_ratio` * lr."""
    if name not in SCHEDULES:
        raise ValueError(f"optim.scheduler.name must be one of {SCHEDULES}, got {name!r}")
    if warmup_steps < 0:
        raise ValueError(f"optim.scheduler.warmup_steps must be >= 0, got {warmup_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"optim.scheduler.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if name != "constant" and not total_steps:
        raise ValueError(f"optim.scheduler.name={name} needs a finite number of steps (set trainer.max_steps)")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        decay = 1.0 - progress if name == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return min_lr_ratio + (1.0 - min_lr_ratio) * decay

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class EditLoRAModule(LightningModule):
    def __init__(
        self,
        transformer: nn.Module,
        conditioner: EditConditioner,
        objective: FlowMatchObjective,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: dict | None = None,
        seed: int = 0,
        val_seed: int = 1234,
        fixed_noise: bool = False,
        attention: str = "auto",
        caption_dropout: float = 0.0,
    ):
        """`caption_dropout`: probability that a training sample uses the empty prompt (`data.caption_dropout`),
        drawn per (seed, step, row) by `fusedit.step.loss.dropped_captions`."""
        super().__init__()
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"data.caption_dropout must be in [0, 1], got {caption_dropout}")
        self.caption_dropout = float(caption_dropout)
        self.edit_loss = EditLoss(objective, attention)
        self.attention = attention
        self.transformer = transformer
        self.conditioner = conditioner
        self.objective = objective
        self.optimizer_factory = optimizer
        self.scheduler_config = dict(scheduler or {})
        self.seed = int(seed)
        self.val_seed = int(val_seed)
        self.fixed_noise = bool(fixed_noise)
        self._trainable = {f"transformer.{name}" for name in lora_parameters(transformer)}
        if not self._trainable:
            raise ValueError("the transformer has no LoRA parameters: build it with fusedit.step.build")
        extra = {name for name, p in self.named_parameters() if p.requires_grad} - self._trainable
        if extra:
            raise ValueError(f"parameters outside the LoRA are trainable: {sorted(extra)[:5]}")
        self._step_started: float | None = None

    # -- what is trained and what is saved ---------------------------------------------------------------------------
    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {name: p for name, p in self.named_parameters() if name in self._trainable}

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """The LoRA weights only: Lightning checkpoints must not carry the frozen base model."""
        out = destination if destination is not None else {}
        for name, parameter in self.trainable_parameters().items():
            out[prefix + name] = parameter if keep_vars else parameter.detach()
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        parameters = self.trainable_parameters()
        # Non-strict: the LoRA tensors the file has, the rest ignored; those loaded are checked all the same.
        loaded = state_dict if strict else {name: value for name, value in state_dict.items() if name in parameters}
        expected = {name: parameters[name].shape for name in (parameters if strict else loaded)}
        # The check train() runs on the file before fit (names, shapes, finite values), for every other caller.
        check_state_dict(loaded, expected, "checkpoint", OTHER_RUN_HINT)
        with torch.no_grad():
            for name, value in loaded.items():
                parameters[name].copy_(value)
        return nn.modules.module._IncompatibleKeys([], [])

    # -- the loss (fusedit.step.loss: the same computation the benchmark times) -----------------------------------
    def _step_seed(self) -> int:
        if self.fixed_noise:  # debug=overfit: the same draw every step, so a fixed batch can be memorised
            return self.seed
        # Distinct per step, identical across restarts (and across ranks: sample_seeds adds the row).
        return (self.seed * 1_000_003 + self.global_step * 7919) % (2**63)

    def predict_velocity(self, noisy: torch.Tensor, inputs: EditInputs, sigmas: torch.Tensor) -> torch.Tensor:
        """Transformer velocity for the target tokens (EditLoss.predict_velocity)."""
        return self.edit_loss.predict_velocity(self.transformer, noisy, inputs, sigmas)

    def compute_loss(self, inputs: EditInputs, seed: int, rows=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, sigmas) for one batch with all randomness drawn from `seed` (per sample with `rows`)."""
        return self.edit_loss.loss(self.transformer, inputs, seed, rows)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        rows = batch.get("row")
        # Without row numbers, the rank keeps the ranks' draws apart.
        seed = self._step_seed() if rows is not None else self._step_seed() + self.global_rank
        if self.caption_dropout > 0.0:
            drop = dropped_captions(
                seed, rows if rows is not None else range(len(batch["prompt"])), self.caption_dropout
            )
            inputs = self.conditioner(batch, drop_prompts=drop)
        else:
            inputs = self.conditioner(batch)
        loss, _ = self.compute_loss(inputs, seed, rows=rows)
        batch_size = inputs.target.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self._batch_stats = (batch_size, batch_size * inputs.tokens_per_sample)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # Fixed seed per batch: the validation loss of two checkpoints is measured on the same noise.
        loss, _ = self.compute_loss(self.conditioner(batch), self.val_seed + batch_idx)
        self.log("val/loss", loss, prog_bar=True, batch_size=len(batch["prompt"]))
        return loss

    # -- speed, memory, gradients ------------------------------------------------------------------------------------
    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self._step_started = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self._step_started is None:
            return
        elapsed = max(time.perf_counter() - self._step_started, 1e-9)
        samples, tokens = self._batch_stats
        self.log("train/samples_per_s", samples / elapsed, prog_bar=True)
        self.log("train/tokens_per_s", tokens / elapsed)
        if self.trainer is not None and self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        if self.device.type == "cuda":
            self.log("train/gpu_mem_gb", torch.cuda.max_memory_allocated(self.device) / 2**30)
            self.log("train/gpu_reserved_gb", torch.cuda.max_memory_reserved(self.device) / 2**30)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Before clipping: the norm the clip threshold is compared with. The optimizer holds exactly the trainable
        # parameters (configure_optimizers); walking the module would visit the frozen base as well, every step.
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            # torch's own total norm (what clip_grad_norm_ computes): foreach kernels on CUDA, not two per tensor.
            self.log("train/grad_norm", torch.nn.utils.get_total_norm([g.float() for g in grads]))

    # -- schedule-free optimizers: training point y while training, averaged point x for validation ----------------
    # (fusedit.optim). Checkpoints are written in training mode, between steps, and restore it exactly; exports and
    # validation images switch through fusedit.optim.evaluation_mode as well.
    def on_train_start(self) -> None:
        set_train_mode(self.trainer.optimizers, True)

    def on_validation_epoch_start(self) -> None:
        self._evaluation = contextlib.ExitStack()
        self._evaluation.enter_context(evaluation_mode(self.trainer.optimizers))

    def on_validation_epoch_end(self) -> None:
        evaluation = getattr(self, "_evaluation", None)
        if evaluation is not None:
            evaluation.close()

    # -- optimisation ------------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=list(self.trainable_parameters().values()))
        config = dict(self.scheduler_config)
        total = self.trainer.estimated_stepping_batches if self.trainer is not None else None
        total = int(total) if total is not None and math.isfinite(total) else None
        scheduler = warmup_schedule(
            optimizer,
            name=config.get("name", "constant"),
            warmup_steps=int(config.get("warmup_steps", 0)),
            total_steps=total,
            min_lr_ratio=float(config.get("min_lr_ratio", 0.0)),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "lr"}}
