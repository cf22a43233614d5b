"""Training from the cache: rows -> keys -> (encode what is missing) -> cached batches -> `EditInputs`.

`CachedEditDataModule` is `EditDataModule` (same metadata, columns, split, buckets, resumable order) whose setup
hashes every row's inputs, encodes only the rows whose key is not in the cache yet (the VAE and text encoder are
loaded then, and only then), and serves batches of cached latents and prompt embeddings. Bucket keys are the
cached latent shapes, so batches still never mix sizes. `CachedConditioner` turns such a batch into the
transformer inputs without any encoder: it holds no weights at all.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fusedit.cache.batches import collate_cached, pad_slots
from fusedit.cache.keys import encoder_fingerprint, file_sha256, row_key
from fusedit.cache.store import LatentCache, shard_bytes_of
from fusedit.data.buckets import BucketBatchSampler
from fusedit.data.datamodule import EditDataModule, split_train_val
from fusedit.data.dataset import EditDataset, collate, plan_sizes
from fusedit.data.errors import DataValidationError
from fusedit.data.prompt_length import PATCH
from fusedit.data.records import Record
from fusedit.data.validation import PathRefused, Sample, record_problems, resolve_path
from fusedit.devices import resolve_device, to_dtype
from fusedit.families import folder_family
from fusedit.regular_files import not_regular_reason
from fusedit.step.conditioning import EditInputs, pad_prompts, unpadded

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CachedRow:
    row: int
    key: str
    prompt: str
    bucket: tuple  # ((1, h, w) of the target, ((1, h, w) of each edit image, ...)) in latent patches


# -------------------------------------------------------------------------------------------------- keys of rows
def hash_record_files(records: list[Record], base_path: Path, allow_absolute: bool, threads: int = 8) -> dict:
    """row -> (image sha256, [edit sha256], mask sha256 or None) for every record whose files all resolve and read;
    others are absent (validation reports them with its usual messages)."""
    paths: dict[int, list[Path]] = {}
    for record in records:
        try:
            # An empty edit_image cell (Qwen-Image-2.1's text-to-image rows) names no file; an empty entry among
            # others is a row problem validation reports.
            edits = [raw for raw in record.edit_images if raw]
            raws = (record.image, *edits, *([record.mask] if record.mask else []))
            paths[record.row] = [resolve_path(raw, base_path, allow_absolute) for raw in raws]
        except PathRefused:
            continue

    def digest(path: Path) -> tuple[Path, str | None]:
        # Only regular files are read: a FIFO or a link to /dev/zero would block or never end (validation then
        # names what the path is).
        if not_regular_reason(path) is not None:
            return path, None
        try:
            return path, file_sha256(path)
        except OSError:
            return path, None

    unique = sorted({path for row_paths in paths.values() for path in row_paths})
    with ThreadPoolExecutor(max_workers=threads) as pool:  # hashlib releases the GIL
        hashes = dict(pool.map(digest, unique))
    out = {}
    masked = {record.row for record in records if record.mask}
    for row, row_paths in paths.items():
        digests = [hashes[path] for path in row_paths]
        if all(digests):
            mask = digests.pop() if row in masked else None
            out[row] = (digests[0], digests[1:], mask)
    return out


def _bucket(entry: dict) -> tuple:
    return (tuple(entry["target"]), tuple(tuple(shape) for shape in entry["edits"]))


def _bucket_sizes(entry: dict) -> tuple[tuple[int, int], tuple[tuple[int, int], ...]]:
    """(target size, edit sizes) in pixels (width, height) of a cached row: its latent shapes (1, h, w) in patches
    of PATCH pixels, which are exactly the sizes `plan_sizes` gave when it was encoded (multiples of 16 and 32)."""
    target, edits = _bucket(entry)
    return (target[2] * PATCH, target[1] * PATCH), tuple((w * PATCH, h * PATCH) for _, h, w in edits)


# -------------------------------------------------------------------------------------------------- encoding
def encode_into_cache(
    samples: list[Sample],
    keys: dict[int, str],
    cache: LatentCache,
    conditioner: nn.Module,
    *,
    max_pixels: int,
    edit_max_pixels: int | None,
    max_image_pixels: int,
    batch_size: int = 1,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    shard_bytes: int = 512 << 20,
    empty_prompts: bool = False,
) -> int:
    """Encode `samples` (row -> key in `keys`) with `conditioner` (an EditConditioner or a Qwen21Conditioner: the
    very code live training runs) and add them to `cache` in shards of about `shard_bytes`. Call inside `cache.writer()`. Returns the count.

    Rows with the same key (identical inputs) are encoded once. A row's mask is stored as its token weights;
    `empty_prompts` (caption dropout) also stores the empty prompt encoded with the row's edit image(s).
    """
    unique: dict[str, Sample] = {}
    for sample in samples:
        unique.setdefault(keys[sample.row], sample)
    samples = list(unique.values())
    if not samples:
        return 0
    samples_by_row = {sample.row: sample for sample in samples}
    dataset = EditDataset(samples, max_pixels, edit_max_pixels, max_image_pixels)
    sampler = BucketBatchSampler(dataset.sizes, batch_size, shuffle=False)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers)
    pending: list = []
    for batch in loader:
        batch["image"] = batch["image"].to(device)
        batch["edit_images"] = [slot.to(device) for slot in batch["edit_images"]]
        pending += _cache_entries(conditioner, batch, keys, samples_by_row, empty_prompts)
        if shard_bytes_of(pending) >= shard_bytes:
            cache.add(pending)
            pending = []
    if pending:
        cache.add(pending)
    return len(samples)


def _cache_entries(
    conditioner: nn.Module, batch: dict, keys: dict[int, str], samples_by_row: dict, empty_prompts: bool
):
    """(key, tensors, info) for each row of one encoded batch, every tensor on the CPU (`encode_into_cache`)."""
    inputs = conditioner(batch)
    empty = conditioner.encode_prompts([""] * len(batch["row"]), batch["edit_images"]) if empty_prompts else None
    # Qwen-Image-2.1 (image_slots set) lists the references first and the target last; the MMDiT the reverse.
    qwen21 = inputs.image_slots is not None
    shapes = inputs.img_shapes[0]
    target_shape, edit_shapes = (shapes[-1], shapes[:-1]) if qwen21 else (shapes[0], shapes[1:])
    conditions = inputs.condition.split([h * w for _, h, w in edit_shapes], dim=1) if edit_shapes else ()
    entries = []
    for i, row in enumerate(batch["row"]):
        prompt = unpadded(inputs.prompt_embeds, inputs.prompt_mask, i).cpu()
        tensors = {
            "target": inputs.target[i].cpu(),
            "edits": [condition[i].cpu() for condition in conditions],
            "prompt": prompt,
        }
        if inputs.token_weights is not None and samples_by_row[row].mask is not None:
            tensors["mask"] = inputs.token_weights[i].cpu()
        if empty is not None:
            tensors["empty_prompt"] = unpadded(*empty[:2], i).cpu()
        if qwen21:
            tensors["image_slots"] = inputs.image_slots[i, : len(prompt)].cpu()
            if empty is not None:
                tensors["empty_image_slots"] = empty[2][i, : len(tensors["empty_prompt"])].cpu()
        entries.append((keys[row], tensors, {"row": row, "target_shape": target_shape, "edit_shapes": edit_shapes}))
    return entries


class CachedEditDataset(Dataset):
    collate_fn = staticmethod(collate_cached)

    def __init__(self, rows: list[CachedRow], cache: LatentCache, verify: bool = True):
        self.rows = list(rows)
        self.cache = cache
        self.verify = verify
        self.sizes = [row.bucket for row in self.rows]  # the bucket keys BucketBatchSampler groups by

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        tensors = self.cache.read(row.key, verify=self.verify)
        target, edits = row.bucket
        qwen21 = "image_slots" in tensors  # Qwen-Image-2.1: references first, target last (as its transformer takes)
        return {
            "target": tensors["target"],
            "edits": tensors["edits"],
            "prompt_embeds": tensors["prompt"],
            "img_shapes": [*edits, target] if qwen21 else [target, *edits],
            "prompt": row.prompt,
            "row": row.row,
            "token_weights": tensors.get("mask"),
            "empty_prompt_embeds": tensors.get("empty_prompt"),
            "image_slots": tensors.get("image_slots"),
            "empty_image_slots": tensors.get("empty_image_slots"),
        }


class CachedConditioner(nn.Module):
    """Stands in for EditConditioner when training from the cache: a cached batch is already the encoding.

    Holds no VAE and no text encoder; only the scheduler config (a JSON file) is read from the pipeline. Validation
    images (`validation_rows`) load the VAE decoder, and only it, at the first round (fusedit.cache.validation).
    """

    def __init__(self, model_path: str | Path, dtype: torch.dtype | None = None):
        super().__init__()
        import diffusers

        from fusedit.cache.validation import CachedSampler, Qwen21CachedSampler
        from fusedit.families import QWEN_IMAGE_21

        path = Path(model_path) / "scheduler" / "scheduler_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"model.path {model_path} has no {path.relative_to(model_path)}")
        config = json.loads(path.read_text())
        scheduler_cls = getattr(diffusers, config.get("_class_name", ""), None)
        if scheduler_cls is None:
            raise ValueError(f"{path}: unknown scheduler class {config.get('_class_name')!r}")
        # The same dict EditConditioner.scheduler_config gives (defaults filled in by the scheduler class).
        self._scheduler_config = dict(scheduler_cls.from_config(config).config)
        self.model_path = Path(model_path)
        # A plain object, not a submodule: Lightning must neither move nor count the VAE it loads on demand.
        sampler_cls = Qwen21CachedSampler if folder_family(Path(model_path)) == QWEN_IMAGE_21 else CachedSampler
        self.sampler = sampler_cls(model_path, scheduler_cls, self._scheduler_config, dtype)

    @property
    def scheduler_config(self) -> dict:
        return dict(self._scheduler_config)

    @property
    def pipeline(self):
        raise RuntimeError(
            "training from the cache has no VAE or text encoder loaded (that is the point of the cache); validation "
            "images come from CachedConditioner.validation_rows, which needs only the VAE decoder"
        )

    def validation_rows(self, module, samples: list[dict], num_inference_steps: int, seed: int) -> list[list]:
        """[*edit images, edited, target, prompt] per cached sample, generated with `module`'s transformer."""
        return self.sampler.rows(module, samples, num_inference_steps, seed)

    def forward(self, batch: dict, drop_prompts: list[bool] | None = None) -> EditInputs:
        """`drop_prompts[i]`: sample i uses its cached empty-prompt encoding (caption dropout)."""
        if "target" not in batch:
            raise ValueError("CachedConditioner got a pixel batch; use CachedEditDataModule (cache.enabled=true)")
        embeds, mask, slots = batch["prompt_embeds"], batch["prompt_mask"], batch.get("image_slots")
        if drop_prompts is not None and any(drop_prompts):
            empty = batch.get("empty_prompt_embeds")
            if empty is None:
                raise ValueError(f"rows {batch['row']} were cached without the empty prompt caption dropout needs")
            chosen = [empty[i] if drop else unpadded(embeds, mask, i) for i, drop in enumerate(drop_prompts)]
            if slots is not None:  # Qwen-Image-2.1: the image slots go with the prompt chosen
                empty_slots = batch["empty_image_slots"]
                slots = pad_slots(
                    [empty_slots[i] if drop else slots[i, : len(chosen[i])] for i, drop in enumerate(drop_prompts)]
                ).to(slots.device)
            embeds, mask = pad_prompts([embed.to(embeds.device) for embed in chosen])
        return EditInputs(
            target=batch["target"],
            condition=batch["condition"],
            prompt_embeds=embeds,
            prompt_mask=mask,
            img_shapes=batch["img_shapes"],
            token_weights=batch.get("token_weights"),
            image_slots=slots,
        )


# -------------------------------------------------------------------------------------------------- data module
class CachedEditDataModule(EditDataModule):
    """EditDataModule over cached encodings. Extra arguments:

    cache_dir: the cache root (one subdirectory per encoder fingerprint). model_path, dtype: the pipeline whose VAE
    and text encoder encode missing rows, in that dtype. build: encode missing rows (else a missing row is an
    error). build_batch_size, build_device ("auto" = the current CUDA device, else CPU), shard_mb: encoding
    settings. build_offload: on a CUDA device, stream the text encoder's layers from host memory while encoding
    (EditConditioner.offload_text_encoder: for GPUs it does not fit). verify: check every row's sha256 when it is
    read.
    """

    def __init__(
        self,
        *,
        cache_dir: str | Path,
        model_path: str | Path,
        dtype: str = "float32",
        build: bool = True,
        build_batch_size: int = 1,
        build_device: str = "auto",
        build_offload: bool = False,
        verify: bool = True,
        shard_mb: int = 512,
        **data_kwargs,
    ):
        super().__init__(model_path=model_path, **data_kwargs)
        if build_batch_size < 1:
            raise ValueError(f"cache.batch_size must be >= 1, got {build_batch_size}")
        self.cache_dir = Path(cache_dir)
        self.model_path = Path(model_path)
        self.dtype = str(dtype)
        self.build = bool(build)
        self.build_batch_size = int(build_batch_size)
        self.build_device = build_device
        self.build_offload = bool(build_offload)
        self.verify = bool(verify)
        self.shard_bytes = int(shard_mb) << 20
        self.cache: LatentCache | None = None
        self.stats: dict = {}

    def open_cache(self) -> LatentCache:
        if self.cache is None:
            hp = self.hparams
            fingerprint = encoder_fingerprint(self.model_path, self.dtype, hp.max_pixels, hp.edit_max_pixels)
            self.cache = LatentCache(self.cache_dir, fingerprint)
        return self.cache

    def _load_conditioner(self, device: torch.device) -> nn.Module:
        from fusedit.step.conditioners import conditioner_class

        cls = conditioner_class(self.model_path)  # the class live training uses (EditConditioner, Qwen21Conditioner)
        if self.build_offload and device.type == "cuda" and not hasattr(cls, "offload_text_encoder"):
            raise ValueError(f"cache.offload=true is not available for {cls.__name__} (model.path {self.model_path})")
        conditioner = cls.from_pretrained(self.model_path, dtype=to_dtype(self.dtype))
        if self.build_offload and device.type == "cuda":
            return conditioner.offload_text_encoder(device)
        return conditioner.to(device)

    def _encode(self, samples: list[Sample], keys: dict[int, str], cache: LatentCache) -> int:
        hp = self.hparams
        device = resolve_device(self.build_device, "cache.device")
        offload = " (text encoder streamed from host memory)" if self.build_offload and device.type == "cuda" else ""
        log.info("cache: encoding %d rows on %s%s into %s", len(samples), device, offload, cache.dir)
        conditioner = self._load_conditioner(device)
        try:
            return encode_into_cache(
                samples, keys, cache, conditioner,
                max_pixels=hp.max_pixels, edit_max_pixels=hp.edit_max_pixels, max_image_pixels=hp.max_image_pixels,
                batch_size=self.build_batch_size, num_workers=hp.num_workers, device=device,
                shard_bytes=self.shard_bytes, empty_prompts=hp.caption_dropout > 0,
            )  # fmt: skip
        finally:
            # The encoders are needed for this and nothing else: free them before training starts.
            del conditioner
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    def _is_cached(self, key: str) -> bool:
        """Row `key` is cached with all this run reads: with caption dropout, its empty-prompt encoding as well (a
        row cached without it is encoded again, once)."""
        entry = self.cache.entries.get(key)
        needed = {"empty_prompt"} if self.hparams.caption_dropout > 0 else set()
        return entry is not None and needed <= set(entry.get("extras", []))

    def _fit_prompts_of(self, records, keys, hits: set[int], samples: list[Sample]):
        """Prompt lengths judged for every row, cached (`hits`, sizes from its cached latents) or to encode
        (`samples`), as `EditDataModule.fit_prompts` judges them, before anything is encoded or trained: (hits
        kept, samples kept with the prompt to encode, row -> prompt). A cached row keeps its key (the row's own
        prompt): its encoding is deterministic in the prompt, images and settings, truncation included."""
        hp = self.hparams
        cache = self.open_cache()
        cached = [(r.row, r.prompt, *_bucket_sizes(cache.entries[keys[r.row]])) for r in records if r.row in hits]
        to_encode = [(s.row, s.prompt, *plan_sizes(s, hp.max_pixels, hp.edit_max_pixels)) for s in samples]
        prompts = self.fit_prompts(cached + to_encode)
        kept = [dataclasses.replace(sample, prompt=prompts[sample.row]) for sample in samples if sample.row in prompts]
        return hits & set(prompts), kept, prompts

    def resolve(self) -> list[CachedRow]:
        """Every usable row as a CachedRow; encodes the missing ones first when `build`. Sets `self.stats`."""
        hp = self.hparams
        started = time.perf_counter()
        cache = self.open_cache()
        records = self.read_records()
        hashes = hash_record_files(records, self.base_path, self.source.allow_absolute)
        keys = {
            row: row_key(cache.hash, record.prompt, *hashes[row]) for record in records if (row := record.row) in hashes
        }
        # A row whose own content is wrong (too many edit images for this pipeline, an empty prompt) goes through
        # validation even when its files are cached, so that it is refused (or skipped) the same way.
        family = folder_family(self.model_path)
        wrong = {record.row for record in records if record_problems(record, self.columns, family)}
        hits = {row for row, key in keys.items() if self._is_cached(key) and row not in wrong}
        missing = [record for record in records if record.row not in hits]
        encoded = 0
        samples: list[Sample] = []
        if missing:
            # Validation (the data module's own, with its messages and on_error) for the rows to encode only:
            # a cached row's bytes were validated when it was encoded, and its key proves they have not changed.
            try:
                samples = self.validate(missing)
            except DataValidationError:
                if hp.on_error == "raise" or not hits:
                    raise
                log.warning("data.on_error=skip: none of the %d rows missing from the cache is valid", len(missing))
            samples = [sample for sample in samples if sample.row in keys]  # a file that changed under our feet
        hits, samples, prompts = self._fit_prompts_of(records, keys, hits, samples)
        if samples:
            with cache.writer():
                todo = [sample for sample in samples if not self._is_cached(keys[sample.row])]  # another rank's too
                if todo and not self.build:
                    raise FileNotFoundError(
                        f"{len(todo)} of {len(records)} rows of {self.metadata} are not in the cache {cache.dir} "
                        f"(first: row {todo[0].row}, {todo[0].image}); run `fusedit cache` with the same settings "
                        "or set cache.build=true"
                    )
                if todo:
                    encoded = self._encode(todo, keys, cache)
        usable = hits | {sample.row for sample in samples}
        rows = [
            CachedRow(record.row, keys[record.row], prompts[record.row], _bucket(cache.entries[keys[record.row]]))
            for record in records
            if record.row in usable
        ]
        cache.check_shards({cache.entries[row.key]["shard"] for row in rows})
        self.stats = {
            "rows": len(records),
            "usable": len(rows),
            "cached": len(rows) - encoded,
            "encoded": encoded,
            "seconds": time.perf_counter() - started,
            "dir": str(cache.dir),
        }
        log.info("cache: %(usable)d rows usable, %(encoded)d encoded now, in %(seconds).1f s (%(dir)s)", self.stats)
        return rows

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        hp = self.hparams
        rows = self.resolve()
        train, val = split_train_val(rows, val_fraction=hp.val_fraction, val_count=hp.val_count, seed=hp.seed)
        self.train_dataset = CachedEditDataset(train, self.cache, self.verify)
        self.val_dataset = CachedEditDataset(val, self.cache, self.verify) if val else None
        self._refuse_empty_epoch(self.train_dataset.sizes)
        log.info("data (cached): %d training and %d validation rows", len(train), len(val))
