"""Training callbacks: LoRA export, validation images. (The progress bar is fusedit.training.progress.StepProgressBar.)"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image

from fusedit.convert.layout import LAYOUTS
from fusedit.io import atomic_write_path
from fusedit.lora.adapter import export_lora
from fusedit.step.conditioning_qwen21 import Qwen21Conditioner
from fusedit.training.ema import find_ema, user_weights

log = logging.getLogger(__name__)


def prune_steps(directory: Path, pattern: str, keep_last: int) -> list[Path]:
    """Delete all but the `keep_last` newest `step-XXXXXX*` files matching `pattern` (0 keeps all). Returns the
    deleted paths. Files of one step (a LoRA and its merged copy) go together; `final.*` never matches."""
    if keep_last <= 0 or not directory.is_dir():
        return []
    by_step: dict[str, list[Path]] = {}
    for path in directory.glob(pattern):
        by_step.setdefault(path.name.split(".")[0], []).append(path)
    deleted = []
    for step in sorted(by_step)[:-keep_last]:  # step-000500 < step-001000: zero-padded names sort by step
        for path in by_step[step]:
            path.unlink(missing_ok=True)
            deleted.append(path)
    return deleted


class LoRAExport(Callback):
    """Write `<dirpath>/step-XXXXXX.safetensors` every `every_n_steps` optimizer steps and `final.safetensors` at
    the end, in diffusers' LoRA layout (`layout`, default standard), and `final-ema.safetensors` beside it when the
    LoRA's EMA is kept (`callbacks=ema`, fusedit.training.ema). `merged_copy` also writes
    `*.merged_qkv.safetensors` in the merged layout (for merged-QKV inference). `keep_last` > 0 keeps only that many
    step exports (like ModelCheckpoint's save_top_k for checkpoints); `final` is always kept.

    A step's export is written after that step's checkpoint: it is due at the step's end but written at the start
    of the next step (or at the end of training, or on a stop), when ModelCheckpoint, which Lightning always calls
    last, has saved. A full disk then fails the export, never the checkpoint it would have been resumed from."""

    def __init__(
        self,
        dirpath: str | Path,
        every_n_steps: int = 0,
        layout: str = "standard",
        merged_copy: bool = False,
        keep_last: int = 0,
    ):
        if every_n_steps < 0:
            raise ValueError(f"lora_export.every_n_steps must be >= 0 (0 = only at the end), got {every_n_steps}")
        if keep_last < 0:
            raise ValueError(f"lora_export.keep_last must be >= 0 (0 = keep every step's export), got {keep_last}")
        if layout not in LAYOUTS:
            raise ValueError(f"lora_export.layout must be one of {LAYOUTS}, got {layout!r}")
        self.dirpath = Path(dirpath)
        self.every_n_steps = int(every_n_steps)
        self.layout = layout
        self.merged_copy = bool(merged_copy)
        self.keep_last = int(keep_last)
        self.last_path: Path | None = None
        self.final_paths: list[Path] = []  # every file the end-of-training export wrote (the run's summary lists them)
        self._last_step: int | None = None
        self._pending: int | None = None

    @rank_zero_only
    def export(self, pl_module: LightningModule, name: str, step: int, ema: bool = False) -> Path:
        """`<name>.safetensors` (and its merged copy) from the trained weights, or from their EMA with `ema`
        (fusedit.training.ema); a schedule-free optimizer's averaged point either way."""
        path = self.dirpath / f"{name}.safetensors"
        meta = {"step": str(step), **({"ema_decay": str(find_ema(pl_module.trainer).decay)} if ema else {})}
        written = [path]
        with user_weights(pl_module, ema=ema):
            export_lora(pl_module.transformer, path, layout=self.layout, **meta)
            if self.merged_copy and self.layout != "merged_qkv":
                written.append(self.dirpath / f"{name}.merged_qkv.safetensors")
                export_lora(pl_module.transformer, written[-1], "merged_qkv", **meta)
        if name.startswith("final"):
            self.final_paths += written
        if ema:
            return path
        self.last_path = path
        self._last_step = step
        if name.startswith("step-"):
            prune_steps(self.dirpath, "step-*.safetensors", self.keep_last)
        return path

    def _export_pending(self, pl_module: LightningModule) -> None:
        step, self._pending = self._pending, None
        if step is not None:
            self.export(pl_module, f"step-{step:06d}", step)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._pending = step

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        self._export_pending(pl_module)  # the weights are still those of the step that made it due

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # A stop (SIGTERM) right after a due step still gets its export; a failing export must not hide `exception`.
        try:
            self._export_pending(pl_module)
        except Exception as error:
            log.error("LoRA export of step %s failed while stopping: %s", self._last_step, error)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._export_pending(pl_module)
        path = self.export(pl_module, "final", trainer.global_step)
        if path is not None:
            log.info("LoRA written to %s", path)
        if find_ema(trainer) is not None:
            path = self.export(pl_module, "final-ema", trainer.global_step, ema=True)
            if path is not None:
                log.info("EMA of the LoRA written to %s", path)


PROMPT_HEIGHT = 14


def sample_sheet(row: ValidationRow) -> Image.Image:
    """One sample as inference's comparison sheet (labelled input [| input 2] | output [| target]), its prompt below."""
    from PIL import ImageDraw

    from fusedit.inference.outputs import comparison_sheet

    inputs = [("input" if len(row.inputs) == 1 else f"input {i + 1}", image) for i, image in enumerate(row.inputs)]
    panels = [*inputs, ("output", row.edited), *([("target", row.target)] if row.target is not None else [])]
    panels_image = comparison_sheet(panels)
    sheet = Image.new("RGB", (panels_image.width, panels_image.height + PROMPT_HEIGHT), "white")
    sheet.paste(panels_image, (0, 0))
    ImageDraw.Draw(sheet).text((2, panels_image.height + 1), row.prompt, fill="black")
    return sheet


def _stack(sheets: list[Image.Image]) -> Image.Image:
    canvas = Image.new("RGB", (max(s.width for s in sheets), sum(s.height for s in sheets)), "white")
    y = 0
    for sheet in sheets:
        canvas.paste(sheet, (0, y))
        y += sheet.height
    return canvas


@dataclass
class ValidationRow:
    """One validation sample: input image(s), the LoRA's edit, the target (None for a user's own sample)."""

    inputs: list[Image.Image]
    edited: Image.Image
    target: Image.Image | None
    prompt: str


class ValidationImages(Callback):
    """Every `every_n_steps` steps edit a few samples with the current LoRA (its EMA with `callbacks=ema`, a
    schedule-free optimizer's averaged weights) and save one labelled sheet per round (input | output | target, the
    prompt below each row; output | target for a text-to-image model) as `<dirpath>/step-XXXXXX.png`; with wandb or
    TensorBoard as a logger also log each sample's sheet, and its input / output / target, as image panels
    (`val/samples`, `val/output`, `val/input`, `val/target`; TensorBoard holds one image per tag and step:
    `val/samples` is the round's whole sheet, the others end in the sample's index, `val/output/0`).
    `keep_last` > 0 keeps only that many of the `step-XXXXXX.png` sheets.

    The samples are the user's own `samples` (each `{edit_image: path or [paths], prompt: str, image: optional
    target path}`, checked before the model loads by `fusedit.training.validate_config`), else the first
    `num_samples` held-out (else training) samples. Generation is diffusers' own QwenImageEdit(Plus)Pipeline (or
    QwenImagePipeline, from the prompt alone, for a text-to-image model; QwenImage21ModularPipeline for
    Qwen-Image-2.1, `generate_qwen21`) with the training transformer plugged in (few steps, no CFG), so what is
    logged is what a user of the LoRA gets.
    Training from the cache, the conditioner generates from the cached encodings with the VAE decoder alone
    (fusedit.cache.validation).

    Why panels and not a wandb.Table of images: wandb (0.31) stores a run table's images in its artifact staging
    directory outside the run dir, so an offline run's table points at PNGs the run dir does not hold. Image panels
    are written under the run's own `files/media/images/` and travel with `wandb sync`.
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
        samples: list | None = None,
        base_path: str | Path | None = None,
        keep_last: int = 0,
    ):
        # One step would divide by zero in the scheduler's stretch to shift_terminal (a NaN image).
        if every_n_steps < 0 or num_samples < 0 or keep_last < 0 or num_inference_steps < 2:
            raise ValueError(
                "validation_images: every_n_steps, num_samples, keep_last >= 0 and num_inference_steps >= 2"
            )
        self.dirpath = Path(dirpath)
        self.every_n_steps = int(every_n_steps)
        self.user_samples = [dict(sample) for sample in samples or []]
        self.base_path = Path(base_path) if base_path else Path.cwd()
        self.num_samples = len(self.user_samples) or int(num_samples)
        self.num_inference_steps = int(num_inference_steps)
        self.true_cfg_scale = float(true_cfg_scale)
        self.seed = int(seed)
        self.at_end = bool(at_end)
        self.keep_last = int(keep_last)
        self._last_step: int | None = None
        self.last_path: Path | None = None

    def _samples(self, trainer: Trainer) -> list[dict]:
        datamodule = trainer.datamodule
        dataset = getattr(datamodule, "val_dataset", None) or getattr(datamodule, "train_dataset", None)
        if dataset is None:
            return []
        return [dataset[index] for index in range(min(self.num_samples, len(dataset)))]

    def user_rows(self) -> list[tuple[list[Image.Image], Image.Image | None, str]]:
        """The user's samples as (input images, target or None, prompt); paths relative to `base_path`."""
        from fusedit.data.images import load_image

        out = []
        for sample in self.user_samples:
            paths = sample.get("edit_image") or []  # none for a text-to-image model
            paths = [paths] if isinstance(paths, str) else list(paths)
            inputs = [load_image(self.base_path / path) for path in paths]
            target = load_image(self.base_path / sample["image"]) if sample.get("image") else None
            out.append((inputs, target, str(sample["prompt"])))
        return out

    def dataset_rows(self, trainer: Trainer, to_pil) -> list[tuple[list[Image.Image], Image.Image | None, str]]:
        out = []
        for sample in self._samples(trainer):
            edits = [to_pil(image[None].float(), output_type="pil")[0] for image in sample["edit_images"]]
            out.append((edits, to_pil(sample["image"][None].float(), output_type="pil")[0], sample["prompt"]))
        return out

    @torch.no_grad()
    def generate(self, trainer: Trainer, pl_module: LightningModule) -> list[ValidationRow]:
        conditioner = pl_module.conditioner
        if hasattr(conditioner, "validation_rows"):  # training from the cache: no text encoder (fusedit.cache)
            rows = conditioner.validation_rows(pl_module, self._samples(trainer), self.num_inference_steps, self.seed)
            return [ValidationRow(list(row[:-3]), row[-3], row[-2], row[-1]) for row in rows]
        if isinstance(conditioner, Qwen21Conditioner):
            return self.generate_qwen21(trainer, pl_module)
        source = conditioner.pipeline
        components = {"processor": source.processor} if not conditioner.text_to_image else {}
        pipeline = type(source)(
            scheduler=type(source.scheduler).from_config(source.scheduler.config),
            vae=source.vae,
            text_encoder=source.text_encoder,
            tokenizer=source.tokenizer,
            transformer=pl_module.transformer,
            **components,
        )
        pipeline.set_progress_bar_config(disable=True)
        samples = (
            self.user_rows() if self.user_samples else self.dataset_rows(trainer, source.image_processor.postprocess)
        )
        rows = []
        was_training = pl_module.transformer.training
        pl_module.transformer.eval()
        try:
            for edits, target, prompt in samples:
                generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
                # A target fixes the size; a user's sample without one gets the pipeline's own size choice.
                size = {"height": target.height, "width": target.width} if target is not None else {}
                # Text-to-image (QwenImagePipeline) generates from the prompt alone.
                image = {} if conditioner.text_to_image else {"image": edits if conditioner.multi_image else edits[0]}
                with torch.autocast(pl_module.device.type, enabled=False):
                    edited = pipeline(
                        **image,
                        prompt=prompt,
                        num_inference_steps=self.num_inference_steps,
                        true_cfg_scale=self.true_cfg_scale,
                        generator=generator,
                        **size,
                    ).images[0]
                rows.append(ValidationRow(edits, edited, target, prompt))
        finally:
            pl_module.transformer.train(was_training)
        return rows

    @torch.no_grad()
    def generate_qwen21(self, trainer: Trainer, pl_module: LightningModule) -> list[ValidationRow]:
        """Qwen-Image-2.1: diffusers' `QwenImage21ModularPipeline` around the trained transformer and the
        conditioner's VAE and Qwen3-VL (`fusedit.inference.qwen21.sample`, what `infer.py` runs). The output takes
        the target's size; the references are resized by the pipeline to the target's area (`output_resolution`),
        or without a target to the first reference's area, so that a dataset row is sampled at its training size."""
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.image_processor import VaeImageProcessor

        from fusedit.inference.qwen21 import disable_progress_bars, pipeline_from_components, sample

        conditioner = pl_module.conditioner
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(conditioner.scheduler_config)
        pipe = pipeline_from_components(
            pl_module.transformer, conditioner.vae, conditioner.text_encoder, conditioner.processor, scheduler
        )
        disable_progress_bars(pipe)
        samples = self.user_rows() if self.user_samples else self.dataset_rows(trainer, VaeImageProcessor().postprocess)
        rows = []
        was_training = pl_module.transformer.training
        pl_module.transformer.eval()
        try:
            for edits, target, prompt in samples:
                sized = target if target is not None else (edits[0] if edits else None)
                size = {"height": target.height, "width": target.width} if target is not None else {}
                with torch.autocast(pl_module.device.type, enabled=False):
                    edited = sample(
                        pipe,
                        prompt,
                        edits,
                        num_inference_steps=self.num_inference_steps,
                        seed=self.seed,
                        guidance_scale=self.true_cfg_scale,
                        output_resolution=round((sized.width * sized.height) ** 0.5) if sized else None,
                        **size,
                    )
                rows.append(ValidationRow(edits, edited.convert("RGB"), target, prompt))
        finally:
            pl_module.transformer.train(was_training)
        return rows

    @rank_zero_only
    def log_images(self, trainer: Trainer, pl_module: LightningModule) -> None:
        step = trainer.global_step
        with user_weights(pl_module):  # the EMA when averaging is on, a schedule-free optimizer's x
            rows = self.generate(trainer, pl_module)
        if rows:
            self.write(rows, step, trainer.loggers)

    def write(self, rows: list[ValidationRow], step: int, loggers=()) -> Path:
        """The sheet file for `rows` at `step`, and the image panels of every wandb / TensorBoard logger among
        `loggers`."""
        sheets = [sample_sheet(row) for row in rows]
        path = self.dirpath / f"step-{step:06d}.png"
        grid = _stack(sheets)
        with atomic_write_path(path) as tmp:
            grid.save(tmp, format="PNG")
        prune_steps(self.dirpath, "step-*.png", self.keep_last)
        self.last_path = path
        self._last_step = step
        panels = {"val/samples": sheets, "val/output": [row.edited for row in rows]}
        if all(row.inputs for row in rows):  # a text-to-image model has no input
            panels["val/input"] = [row.inputs[0] for row in rows]
        targets = [row.target for row in rows if row.target is not None]
        if targets:
            panels["val/target"] = targets
        prompts = [row.prompt for row in rows]
        for logger in loggers:
            if isinstance(logger, WandbLogger):
                for key, images in panels.items():
                    caption = {"caption": prompts} if len(images) == len(prompts) else {}
                    logger.log_image(key=key, images=images, step=step, **caption)
            elif isinstance(logger, TensorBoardLogger):
                # TensorBoard holds one image per tag and step: the round's grid (the PNG written above) as
                # val/samples, each sample's panels as val/<panel>/<index>; the prompts as text.
                writer = logger.experiment
                writer.add_image("val/samples", np.asarray(grid), step, dataformats="HWC")
                for key, images in panels.items():
                    if key == "val/samples":
                        continue
                    for index, image in enumerate(images):
                        writer.add_image(f"{key}/{index}", np.asarray(image.convert("RGB")), step, dataformats="HWC")
                for index, prompt in enumerate(prompts):
                    writer.add_text(f"val/prompt/{index}", prompt, step)
                writer.flush()
        return path

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        due = self.every_n_steps and self.num_samples and step > 0 and step % self.every_n_steps == 0
        if due and step != self._last_step:
            self.log_images(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.at_end and self.num_samples and trainer.global_step != self._last_step and trainer.global_step > 0:
            self.log_images(trainer, pl_module)
