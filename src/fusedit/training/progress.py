"""The training progress bar: Lightning's Rich bar, counting optimizer steps when the run is bounded by steps.

Lightning's bar counts the batches of the current epoch and labels it `Epoch N/<max_epochs - 1>`. fusedit trains
for `trainer.max_steps` with `max_epochs=-1`, which Lightning shows as "Epoch 3/-2", with a bar that starts again
at every epoch (a small dataset has a few batches per epoch) and never tells how far the run is. Bounded by steps,
this bar runs once over the whole run, from the global step (a resumed run starts where it stopped) to
`max_steps`, and its label names the epoch. Bounded by epochs it is Lightning's bar.

Lightning also shows the logger's version as `v_num` (`v_num: 0.000` with fast_dev_run's dummy logger); the run
directory names a fusedit run, so it is left out. Under `debug=fdr` (fast_dev_run: one batch) the label says so
instead of "Epoch 0/0", and the speed column, which needs two steps to measure, is left out instead of "0.00it/s".
"""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import ProcessingSpeedColumn


class StepProgressBar(RichProgressBar):
    """`RichProgressBar` showing `Steps (epoch N) ━━━━ 12/30` for step-bounded training."""

    def _counts_steps(self) -> bool:
        # Lightning's own test for a step-bounded run (ProgressBar.total_train_batches).
        max_steps = self.trainer.max_steps
        return self.trainer.max_epochs == -1 and max_steps is not None and max_steps > 0

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self._counts_steps() else super().total_train_batches

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items

    def configure_columns(self, trainer) -> list:
        columns = super().configure_columns(trainer)
        if trainer.fast_dev_run:
            columns = [column for column in columns if not isinstance(column, ProcessingSpeedColumn)]
        return columns

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.fast_dev_run:
            batches = int(self.trainer.fast_dev_run)
            description = f"Debug run ({batches} batch{'es' if batches > 1 else ''})"
        elif self._counts_steps():
            description = f"Steps (epoch {current_epoch})"
        elif self.trainer.max_epochs in (None, -1):
            description = f"Epoch {current_epoch}"  # unbounded: no "/-2"
        else:
            return super()._get_train_description(current_epoch)
        # Same width as the validation bar's label, as Lightning pads it, so the bars do not jump.
        return f"{description:{len(self.validation_description)}}"

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        bar = self.train_progress_bar_id
        if self._counts_steps() and bar is not None and self.progress is not None:
            # One bar for the whole run: a new epoch changes the label only, not the count or the timer.
            self.progress.update(bar, description=self._get_train_description(trainer.current_epoch))
            self.refresh()
            return
        super().on_train_epoch_start(trainer, pl_module)
        if self._counts_steps() and self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(self.train_progress_bar_id, completed=trainer.global_step)  # a resumed run

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # Lightning's bar shows `batch_idx + 1` completed; counting steps, that is the global step.
        position = trainer.global_step - 1 if self._counts_steps() else batch_idx
        super().on_train_batch_end(trainer, pl_module, outputs, batch, position)
