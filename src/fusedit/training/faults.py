"""Non-finite losses and gradients: skip the optimizer step, count it, and stop after too many in a row.

One NaN from a bad batch or an fp16/bf16 overflow must not poison the LoRA: AdamW would write NaN into every
parameter and both moment buffers, and every later step (and checkpoint) would carry it. The check runs in
`on_before_optimizer_step`, i.e. after backward (and after DDP's all-reduce) and before clipping and the update:

- the step is skipped by dropping every gradient (`p.grad = None`): torch optimizers leave parameters without a
  gradient untouched, their moments and step counts included; clipping sees nothing. The global step and the LR
  schedule still advance (the batch was consumed), so a resumed run stays aligned with the data;
- a non-finite loss shows up here as non-finite gradients (backward through NaN yields NaN); the loss itself is
  checked too (recorded in `on_before_backward`), for the rare inf loss with finite gradients;
- the decision is reduced over all ranks (any rank non-finite -> every rank skips): under FSDP each rank only
  sees its own gradient shards, and ranks that disagree would desynchronise the replicas;
- `train/skipped_steps` (total) is logged, and kept in checkpoints so a resumed run keeps counting;
- `max_consecutive` skips in a row stop the run: the LoRA (unchanged since the last good step) is exported to
  `<lora dir>/last-good.safetensors` and `NonFiniteTrainingError` says what happened and what to try.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from fusedit.errors import Refusal

log = logging.getLogger(__name__)

LAST_GOOD = "last-good"


class NonFiniteTrainingError(Refusal, RuntimeError):
    """Too many consecutive non-finite steps: the run stopped, keeping the last good LoRA."""


def all_finite(tensors) -> bool:
    # One host sync for the whole set: a bool() per tensor would stall the GPU once per LoRA weight (over a
    # thousand for attn_mlp on the 60-block model), every step.
    flags = [torch.isfinite(t).all() for t in tensors if t is not None]
    return bool(torch.stack(flags).all()) if flags else True


class NonFiniteGuard(Callback):
    def __init__(self, max_consecutive: int = 5, lora_dir: str | Path | None = None):
        if max_consecutive < 1:
            raise ValueError(f"faults.max_consecutive_nonfinite must be >= 1, got {max_consecutive}")
        self.max_consecutive = int(max_consecutive)
        self.lora_dir = Path(lora_dir) if lora_dir is not None else None
        self.skipped = 0
        self.consecutive = 0
        self.last_good_path: Path | None = None
        self._loss: torch.Tensor | None = None

    # -- the check -----------------------------------------------------------------------------------------------
    def _locally_finite(self, optimizer) -> bool:
        loss, self._loss = self._loss, None
        # The optimizer's parameters are the trainable set; walking the module would visit the frozen base too.
        return all_finite([loss, *(p.grad for group in optimizer.param_groups for p in group["params"])])

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        self._loss = loss.detach()

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        finite = trainer.strategy.reduce_boolean_decision(self._locally_finite(optimizer), all=True)
        if finite:
            self.consecutive = 0
        else:
            self.skipped += 1
            self.consecutive += 1
            for group in optimizer.param_groups:
                for parameter in group["params"]:
                    parameter.grad = None
            log.warning(
                "step %d: non-finite loss or gradient, optimizer step skipped (%d in a row, %d in total)",
                trainer.global_step + 1,
                self.consecutive,
                self.skipped,
            )
        pl_module.log("train/skipped_steps", float(self.skipped), rank_zero_only=True)
        if self.consecutive >= self.max_consecutive:
            self._stop(trainer, pl_module)

    def _stop(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from fusedit.lora.adapter import export_lora
        from fusedit.training.callbacks import LoRAExport

        exporter = next((cb for cb in trainer.callbacks if isinstance(cb, LoRAExport)), None)
        lora_dir = self.lora_dir or (exporter.dirpath if exporter else Path(trainer.default_root_dir) / "lora")
        path = lora_dir / f"{LAST_GOOD}.safetensors"
        if trainer.is_global_zero:
            layout = exporter.layout if exporter else "standard"
            # The weights have not changed since the last finite step: every bad step was skipped.
            export_lora(pl_module.transformer, path, layout=layout, step=str(trainer.global_step), stopped="nonfinite")
        self.last_good_path = path
        raise NonFiniteTrainingError(
            f"{self.consecutive} optimizer steps in a row had a non-finite loss or gradient (up to step "
            f"{trainer.global_step + 1}; {self.skipped} skipped in total); stopped. The last good LoRA is {path}. "
            "Try a lower optim.lr, optim.grad_clip, precision=fp32, or check the data of those steps; "
            "raise faults.max_consecutive_nonfinite to tolerate longer streaks."
        )

    # -- resumable counters ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))
