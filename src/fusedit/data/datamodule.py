"""EditDataModule: metadata file -> validated samples -> bucketed, resumable train/val DataLoaders.

Batches are dicts: {"image": [B,3,H,W], "edit_images": [per edit slot: [B,3,h,w]], "prompt": [str], "row": [int]},
pixels in [-1, 1]. Encoding (VAE, text encoder) is the training module's job; `fusedit.data.images.to_pil`
turns an edit-image tensor back into the PIL image Qwen2.5-VL takes.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from pathlib import Path

from lightning.pytorch import LightningDataModule
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from fusedit.data.buckets import BucketBatchSampler
from fusedit.data.dataset import EditDataset, Size, collate, plan_sizes
from fusedit.data.errors import DataValidationError
from fusedit.data.images import DEFAULT_MAX_IMAGE_PIXELS, EDIT_MULTIPLE, TARGET_MULTIPLE
from fusedit.data.prompt_length import LONG_PROMPT_CHOICES, prompt_counter
from fusedit.data.records import Record
from fusedit.data.sources import DATA_FORMATS, DataSource, refuse_bad_source
from fusedit.data.validation import ON_ERROR_CHOICES, Problem, Sample, raise_or_skip, validate_records
from fusedit.families import folder_family, needs_edit_image

log = logging.getLogger(__name__)


def split_train_val(
    samples: list[Sample], *, val_fraction: float = 0.0, val_count: int | None = None, seed: int = 0
) -> tuple[list[Sample], list[Sample]]:
    """Hold out `val_count` samples (or round(val_fraction * n)), chosen by `seed`; order within each is kept."""
    count = val_count if val_count is not None else round(val_fraction * len(samples))
    if count == 0:
        return list(samples), []
    if count >= len(samples):
        raise DataValidationError(
            f"data.val_count/val_fraction hold out {count} of {len(samples)} valid samples, which leaves no training "
            "data; lower data.val_count or data.val_fraction"
        )
    held_out = set(random.Random(seed).sample(range(len(samples)), count))
    train = [sample for index, sample in enumerate(samples) if index not in held_out]
    val = [sample for index, sample in enumerate(samples) if index in held_out]
    return train, val


class _ResumableLoader(DataLoader):
    """A DataLoader Lightning recognises as resumable; its position is the data module's (one source of truth)."""

    def __init__(self, *args, position: EditDataModule, **kwargs):
        super().__init__(*args, **kwargs)
        self._position = position

    def state_dict(self) -> dict:
        return self._position.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self._position.load_state_dict(state_dict)


def refuse_bad_settings(hp) -> None:
    """`ValueError` naming the first data.* setting out of range: config errors surface at construction (Hydra
    instantiate), before any file is read."""
    choices = {"on_error": ON_ERROR_CHOICES, "long_prompt": LONG_PROMPT_CHOICES, "format": DATA_FORMATS}
    for key, allowed in choices.items():
        if hp[key] not in allowed:
            raise ValueError(f"data.{key} must be one of {allowed}, got {hp[key]!r}")
    minimum = {"batch_size": 1, "num_workers": 0, "dataset_repeat": 1, "max_pixels": TARGET_MULTIPLE**2}
    for key, least in {**minimum, "val_count": 0, "edit_max_pixels": EDIT_MULTIPLE**2}.items():
        if hp[key] is not None and hp[key] < least:
            null = " or null" if key in ("val_count", "edit_max_pixels") else ""
            raise ValueError(f"data.{key} must be >= {least}{null}, got {hp[key]}")
    for key, high in {"val_fraction": "1)", "caption_dropout": "1]"}.items():
        if not (0.0 <= hp[key] < 1.0 or (high == "1]" and hp[key] == 1.0)):
            raise ValueError(f"data.{key} must be in [0, {high}, got {hp[key]}")
    if hp.max_image_pixels < hp.max_pixels:
        raise ValueError(f"data.max_image_pixels ({hp.max_image_pixels}) must be >= data.max_pixels ({hp.max_pixels})")
    refuse_bad_source(hp)


def _plain(value):
    """Hyperparameters as plain Python: checkpoints load with torch.load(weights_only=True), which refuses PosixPath
    and OmegaConf containers."""
    if isinstance(value, Path):
        return str(value)
    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)
    return list(value) if isinstance(value, tuple) else value


class EditDataModule(LightningDataModule):
    def __init__(
        self,
        metadata: str | Path | None = None,
        base_path: str | Path | None = None,
        image_column: str = "image",
        edit_image_column: str = "edit_image",
        prompt_column: str = "prompt",
        max_pixels: int = 1024 * 1024,
        edit_max_pixels: int | None = None,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        batch_size: int = 1,
        num_workers: int = 0,
        dataset_repeat: int = 1,
        val_fraction: float = 0.0,
        val_count: int | None = None,
        on_error: str = "raise",
        allow_absolute_paths: bool = False,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        pin_memory: bool = False,
        validation_threads: int | None = None,
        model_path: str | Path | None = None,
        long_prompt: str = "raise",
        format: str = "metadata",
        image_dir: str | Path | None = None,
        control_dirs: list[str | Path] = (),
        mask_dir: str | Path | None = None,
        path: str | Path | None = None,
        split: str = "train",
        extract_dir: str | Path | None = None,
        columns: dict[str, str] | None = None,
        mask_column: str = "mask",
        caption_dropout: float = 0.0,
    ):
        """`model_path`: the pipeline folder the rows are judged against (train() passes `model.path`): the number of
        edit images its family takes (`fusedit.families`) and the prompt length its text positions allow
        (`fusedit.data.prompt_length`, counted with its tokenizer and processor; no weight is read). None: one or
        more edit images, prompts not counted. `long_prompt`: "raise" refuses a prompt too long (a bad row, which
        `on_error=skip` skips), "truncate" shortens it to fit, with a warning naming the row.

        Where rows come from (`format`, fusedit.data.sources): "metadata" (`metadata`, a CSV/JSONL file), "folder"
        (`image_dir`, `control_dirs`, `mask_dir`) or "hf" (`path`, `split`, `extract_dir`: a local Hugging Face
        dataset). `columns` ({role: column}) overrides the *_column names. `caption_dropout`: the probability that
        a training sample uses the empty prompt (applied by the training step, fusedit.step.loss)."""
        super().__init__()
        self.save_hyperparameters({k: _plain(v) for k, v in locals().items() if k not in ("self", "__class__")})
        refuse_bad_settings(self.hparams)
        self.source = DataSource.from_settings(self.hparams)
        self.metadata = self.source.location  # what messages name: the metadata file, image folder or dataset
        self.base_path = self.source.base_path
        self.columns = self.source.columns
        self.train_dataset: EditDataset | None = None
        self.val_dataset: EditDataset | None = None
        self._train_sampler: BucketBatchSampler | None = None
        self._pending_state: dict | None = None
        self._consumed = {"epoch": None, "batches": 0}

    def read_records(self) -> list[Record]:
        """The configured source's rows (`DataSource.records`), not yet validated. For a model that draws from text
        alone (`model_path` is Qwen-Image or Qwen-Image-2.1: `fusedit.families.needs_edit_image` is False) the
        edit_image column may be left out or empty (its rows then have no edit image); whether a row may name one
        is validation's question."""
        model_path = self.hparams.model_path
        optional = model_path is not None and not needs_edit_image(folder_family(model_path))
        return self.source.records(edit_image_optional=optional)

    def validate(self, records) -> list:
        """Check `records` with this module's settings (files, pixel limit, paths, on_error); the valid samples."""
        hp = self.hparams
        return validate_records(
            records,
            metadata=self.metadata,
            base_path=self.base_path,
            columns=self.columns,
            max_image_pixels=hp.max_image_pixels,
            allow_absolute_paths=self.source.allow_absolute,
            on_error=hp.on_error,
            num_threads=hp.validation_threads,
            family=folder_family(hp.model_path) if hp.model_path is not None else None,
        )

    def check_prompt_lengths(self, samples: list[Sample]) -> list[Sample]:
        """`samples` whose prompts fit the transformer's text positions beside their images (see `long_prompt`)."""
        hp = self.hparams
        planned = {sample.row: plan_sizes(sample, hp.max_pixels, hp.edit_max_pixels) for sample in samples}
        prompts = self.fit_prompts([(sample.row, sample.prompt, *planned[sample.row]) for sample in samples])
        return [dataclasses.replace(sample, prompt=prompts[sample.row]) for sample in samples if sample.row in prompts]

    def fit_prompts(self, rows: list[tuple[int, str, Size, tuple[Size, ...]]]) -> dict[int, str]:
        """row -> the prompt to train on, for `rows` of (row, prompt, target size, edit sizes), sizes (width,
        height) in pixels as the sample is resized: the prompt itself when it fits the text positions its images
        leave, else shortened (`long_prompt=truncate`, warned) or refused (`raise`: DataValidationError naming the
        rows and counts, or those rows left out with `on_error=skip`). Rows from the files and rows from the cache
        (`fusedit.cache.data`) are judged here alike. No pipeline (`model_path` None): every prompt as it is."""
        hp = self.hparams
        if hp.model_path is None or not rows:
            return {row: prompt for row, prompt, *_ in rows}
        counter = prompt_counter(hp.model_path)
        kept, problems = {}, []
        for row, prompt, target, edits in rows:
            limit = counter.limit(target, list(edits))
            length = counter.count(prompt, list(edits))
            if length <= limit:
                kept[row] = prompt
            elif hp.long_prompt == "truncate":
                kept[row], shortened = counter.shorten(prompt, list(edits), limit)
                log.warning(
                    "row %d: prompt of %d text tokens truncated to %d to fit the %d text positions left beside its "
                    "images (data.long_prompt=truncate)", row, length, shortened, limit,
                )  # fmt: skip
            else:
                reason = (
                    f"prompt is {length} text tokens ({counter.counted}), but "
                    f"{counter.room(limit)}; shorten it, or set data.long_prompt=truncate"
                )
                problems.append(Problem(row, self.columns.prompt, "", reason))
        raise_or_skip(problems, len(kept), len(rows), self.metadata, hp.on_error)
        return kept

    # -- setup --------------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return  # validated once, however many stages call setup
        hp = self.hparams
        samples = self.check_prompt_lengths(self.validate(self.read_records()))
        train, val = split_train_val(samples, val_fraction=hp.val_fraction, val_count=hp.val_count, seed=hp.seed)
        sizes = (hp.max_pixels, hp.edit_max_pixels, hp.max_image_pixels)
        self.train_dataset = EditDataset(train, *sizes)
        self.val_dataset = EditDataset(val, *sizes) if val else None
        self._refuse_empty_epoch(self.train_dataset.sizes)
        log.info("data: %d training and %d validation samples from %s", len(train), len(val), self.metadata)

    def _refuse_empty_epoch(self, sizes) -> None:
        """With drop_last, a bucket smaller than data.batch_size yields no batch; all of them would train 0 steps."""
        hp = self.hparams
        _, world = self._rank_and_world()
        batches = len(BucketBatchSampler(sizes, hp.batch_size, shuffle=False, drop_last=hp.drop_last, world_size=world))
        if batches == 0:
            raise DataValidationError(
                f"{self.metadata}: data.batch_size={hp.batch_size} with data.drop_last=true leaves no full batch "
                f"({len(sizes)} training samples, grouped by aspect-ratio bucket, on {world} device(s)): an epoch "
                "would train 0 steps. Lower data.batch_size or set data.drop_last=false"
            )

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        if trainer.world_size > 1 and getattr(trainer._accelerator_connector, "use_distributed_sampler", False):
            raise ValueError(
                "EditDataModule shards its own aspect-ratio buckets across ranks; set trainer.use_distributed_sampler"
                "=false so Lightning does not try to wrap its batch sampler"
            )
        return trainer.global_rank, trainer.world_size

    def _require_setup(self) -> None:
        if self.train_dataset is None:
            raise RuntimeError("EditDataModule.setup() must run before asking for a dataloader")

    def _loader(self, dataset: EditDataset, sampler: BucketBatchSampler, resumable: bool = False) -> DataLoader:
        workers = self.hparams.num_workers
        cls, extra = (_ResumableLoader, {"position": self}) if resumable else (DataLoader, {})
        return cls(
            dataset,
            batch_sampler=sampler,
            collate_fn=getattr(dataset, "collate_fn", collate),
            num_workers=workers,
            pin_memory=self.hparams.pin_memory,
            persistent_workers=workers > 0,
            **extra,
        )

    def train_sampler(self) -> BucketBatchSampler:
        """The training batch sampler, created once so its epoch and resume position survive dataloader reloads."""
        self._require_setup()
        if self._train_sampler is None:
            rank, world = self._rank_and_world()
            hp = self.hparams
            self._train_sampler = BucketBatchSampler(
                self.train_dataset.sizes,
                hp.batch_size,
                shuffle=hp.shuffle,
                seed=hp.seed,
                drop_last=hp.drop_last,
                rank=rank,
                world_size=world,
                repeat=hp.dataset_repeat,
            )
        if self._pending_state is not None:
            self._train_sampler.load_state_dict(self._pending_state)
            self._pending_state = None
        return self._train_sampler

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, self.train_sampler(), resumable=True)

    def val_dataloader(self) -> DataLoader | list:
        self._require_setup()
        if self.val_dataset is None:
            return []  # Lightning skips validation for an empty list
        rank, world = self._rank_and_world()
        sampler = BucketBatchSampler(
            self.val_dataset.sizes, self.hparams.batch_size, shuffle=False, rank=rank, world_size=world
        )
        return self._loader(self.val_dataset, sampler)

    # -- resumable position ---------------------------------------------------------------------------------------
    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        # Counted here, where a batch reaches the training step: the sampler itself runs ahead by the prefetch depth.
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training and self._train_sampler is not None:
            epoch = self._train_sampler.current_epoch
            if epoch != self._consumed["epoch"]:
                self._consumed = {"epoch": epoch, "batches": 0}
            self._consumed["batches"] += 1
        return batch

    def state_dict(self) -> dict:
        """{"epoch", "batches_consumed", "seed"}: where training is in the data; saved in Lightning checkpoints."""
        if self._consumed["epoch"] is None:
            if self._pending_state is not None:
                return dict(self._pending_state)
            if self._train_sampler is not None:
                return self._train_sampler.state_dict()
            return {"epoch": 0, "batches_consumed": 0, "seed": self.hparams.seed}
        return {
            "epoch": self._consumed["epoch"],
            "batches_consumed": self._consumed["batches"],
            "seed": self.hparams.seed,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending_state = dict(state_dict)
        self._consumed = {"epoch": int(state_dict["epoch"]), "batches": int(state_dict["batches_consumed"])}
        if self._train_sampler is not None:
            self.train_sampler()  # applies the pending state now
