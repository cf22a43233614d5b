"""Training callbacks: LoRA export, validation images. (The progress bar is fusedit.training.progress.StepProgressBar.)"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image

from fusedit.convert.layout import LAYOUTS
from fusedit.io import atomic_write_path
from fusedit.lora.adapter import export_lora

log = logging.getLogger(__name__)


class LoRAExport(Callback):
    """Write `<dirpath>/step-XXXXXX.safetensors` every `every_n_steps` optimizer steps and `final.safetensors` at
    the end, in diffusers' LoRA layout (`layout`, default standard). `merged_copy` also writes
    `*.merged_qkv.safetensors` in the merged layout (for merged-QKV inference)."""

    def __init__(
        self, dirpath: str | Path, every_n_steps: int = 0, layout: str = "standard", merged_copy: bool = False
    ):
        if every_n_steps < 0:
            raise ValueError(f"lora_export.every_n_steps must be >= 0 (0 = only at the end), got {every_n_steps}")
        if layout not in LAYOUTS:
            raise ValueError(f"lora_export.layout must be one of {LAYOUTS}, got {layout!r}")
        self.dirpath = Path(dirpath)
        self.every_n_steps = int(every_n_steps)
        self.layout = layout
        self.merged_copy = bool(merged_copy)
        self.last_path: Path | None = None
        self._last_step: int | None = None

    @rank_zero_only
    def export(self, pl_module: LightningModule, name: str, step: int) -> Path:
        path = self.dirpath / f"{name}.safetensors"
        meta = {"step": str(step)}
        export_lora(pl_module.transformer, path, layout=self.layout, **meta)
        if self.merged_copy and self.layout != "merged_qkv":
            export_lora(pl_module.transformer, self.dirpath / f"{name}.merged_qkv.safetensors", "merged_qkv", **meta)
        self.last_path = path
        self._last_step = step
        return path

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.export(pl_module, f"step-{step:06d}", step)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        path = self.export(pl_module, "final", trainer.global_step)
        if path is not None:
            log.info("LoRA written to %s", path)


def _grid(rows: list[list[Image.Image]]) -> Image.Image:
    width = max(sum(image.width for image in row) for row in rows)
    height = sum(max(image.height for image in row) for row in rows)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    y = 0
    for row in rows:
        x = 0
        for image in row:
            canvas.paste(image, (x, y))
            x += image.width
        y += max(image.height for image in row)
    return canvas


class ValidationImages(Callback):
    """Every `every_n_steps` steps edit `num_samples` held-out (else training) samples with the current LoRA and log
    a table input | edited | target: to wandb when it is a logger, and always as `<dirpath>/step-XXXXXX.png`.

    Generation is diffusers' own QwenImageEdit(Plus)Pipeline with the training transformer plugged in (few steps,
    no CFG), so what is logged is what a user of the LoRA gets. Training from the cache, the conditioner generates
    from the cached encodings with the VAE decoder alone (fusedit.cache.validation).
    """

    def __init__(
        self,
        dirpath: str | Path,
        every_n_steps: int = 0,
        num_samples: int = 2,
        num_inference_steps: int = 8,
        true_cfg_scale: float = 1.0,
        seed: int = 0,
        at_end: bool = True,
    ):
        # One step would divide by zero in the scheduler's stretch to shift_terminal (a NaN image).
        if every_n_steps < 0 or num_samples < 0 or num_inference_steps < 2:
            raise ValueError("validation_images: every_n_steps, num_samples >= 0 and num_inference_steps >= 2")
        self.dirpath = Path(dirpath)
        self.every_n_steps = int(every_n_steps)
        self.num_samples = int(num_samples)
        self.num_inference_steps = int(num_inference_steps)
        self.true_cfg_scale = float(true_cfg_scale)
        self.seed = int(seed)
        self.at_end = bool(at_end)
        self._last_step: int | None = None
        self.last_path: Path | None = None

    def _samples(self, trainer: Trainer) -> list[dict]:
        datamodule = trainer.datamodule
        dataset = getattr(datamodule, "val_dataset", None) or getattr(datamodule, "train_dataset", None)
        if dataset is None:
            return []
        return [dataset[index] for index in range(min(self.num_samples, len(dataset)))]

    @torch.no_grad()
    def generate(self, trainer: Trainer, pl_module: LightningModule) -> list[list[Image.Image]]:
        conditioner = pl_module.conditioner
        if hasattr(conditioner, "validation_rows"):  # training from the cache: no text encoder (fusedit.cache)
            return conditioner.validation_rows(pl_module, self._samples(trainer), self.num_inference_steps, self.seed)
        source = conditioner.pipeline
        pipeline = type(source)(
            scheduler=type(source.scheduler).from_config(source.scheduler.config),
            vae=source.vae,
            text_encoder=source.text_encoder,
            tokenizer=source.tokenizer,
            processor=source.processor,
            transformer=pl_module.transformer,
        )
        pipeline.set_progress_bar_config(disable=True)
        to_pil = source.image_processor.postprocess
        rows = []
        was_training = pl_module.transformer.training
        pl_module.transformer.eval()
        try:
            for sample in self._samples(trainer):
                edits = [to_pil(image[None].float(), output_type="pil")[0] for image in sample["edit_images"]]
                target = to_pil(sample["image"][None].float(), output_type="pil")[0]
                generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
                with torch.autocast(pl_module.device.type, enabled=False):
                    edited = pipeline(
                        image=edits if conditioner.multi_image else edits[0],
                        prompt=sample["prompt"],
                        height=target.height,
                        width=target.width,
                        num_inference_steps=self.num_inference_steps,
                        true_cfg_scale=self.true_cfg_scale,
                        generator=generator,
                    ).images[0]
                rows.append([*edits, edited, target, sample["prompt"]])
        finally:
            pl_module.transformer.train(was_training)
        return rows

    @rank_zero_only
    def log_images(self, trainer: Trainer, pl_module: LightningModule) -> None:
        step = trainer.global_step
        rows = self.generate(trainer, pl_module)
        if not rows:
            return
        path = self.dirpath / f"step-{step:06d}.png"
        with atomic_write_path(path) as tmp:
            _grid([row[:-1] for row in rows]).save(tmp, format="PNG")
        self.last_path = path
        self._last_step = step
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                columns = ["input", "edited", "target", "prompt"]
                data = [
                    [wandb.Image(_grid([row[:-3]])), wandb.Image(row[-3]), wandb.Image(row[-2]), row[-1]]
                    for row in rows
                ]
                logger.log_table(key="val/images", columns=columns, data=data, step=step)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        due = self.every_n_steps and self.num_samples and step > 0 and step % self.every_n_steps == 0
        if due and step != self._last_step:
            self.log_images(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.at_end and self.num_samples and trainer.global_step != self._last_step and trainer.global_step > 0:
            self.log_images(trainer, pl_module)
