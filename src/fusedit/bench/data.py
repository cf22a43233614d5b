"""Data-pipeline throughput: can decode + resize + bucket + collate on the CPU keep up with the GPU step?

Runs fusedit.data's real path (EditDataModule -> BucketBatchSampler -> EditDataset -> collate) over a dataset,
by default a synthetic one of camera-sized JPEGs (noise over gradients, so they do not compress to nothing),
for each requested worker count; plus a one-process breakdown per image of decode, resize and to-tensor.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from fusedit.data.images import load_image, resize_edit, resize_target, to_tensor
from fusedit.data.records import write_metadata_csv
from fusedit.io import atomic_write_path


def make_jpeg_dataset(out_dir: str | Path, samples: int, size: tuple[int, int], seed: int = 0) -> Path:
    """`samples` (target, edit) JPEG pairs of `size` (width, height) and a metadata.csv; returns its path."""
    if samples < 1:
        raise ValueError(f"data samples must be >= 1, got {samples}")
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    width, height = size
    ramp = np.linspace(0, 160, width, dtype=np.float32)[None, :, None] + np.linspace(0, 60, height)[:, None, None]
    rows = []
    for index in range(samples):
        for role in ("edit", "target"):
            pixels = ramp + rng.normal(48, 24, (height, width, 3)).astype(np.float32)
            image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB")
            with atomic_write_path(out / f"images/{role}_{index:04d}.jpg") as tmp:
                image.save(tmp, format="JPEG", quality=90)
        rows.append((f"images/target_{index:04d}.jpg", f"images/edit_{index:04d}.jpg", f"edit number {index}"))
    return write_metadata_csv(out / "metadata.csv", rows)


def _stage_breakdown(dataset, limit: int = 8) -> dict[str, float]:
    totals = {"decode": 0.0, "resize": 0.0, "to_tensor": 0.0}
    images = 0
    for index in range(min(limit, len(dataset))):
        sample = dataset.samples[index]
        target, edits = dataset.sizes[index]
        for path, size, resize in ((sample.image, target, resize_target),) + tuple(
            (path, edit, resize_edit) for path, edit in zip(sample.edit_images, edits)
        ):
            start = time.perf_counter()
            image = load_image(path)
            decoded = time.perf_counter()
            image = resize(image, size)
            resized = time.perf_counter()
            to_tensor(image)
            done = time.perf_counter()
            totals["decode"] += decoded - start
            totals["resize"] += resized - decoded
            totals["to_tensor"] += done - resized
            images += 1
    return {stage: 1000 * seconds / max(images, 1) for stage, seconds in totals.items()}


def measure_data(
    metadata: str | Path | None = None,
    samples: int = 32,
    image_size: tuple[int, int] = (1328, 1328),
    max_pixels: int = 1024 * 1024,
    edit_max_pixels: int | None = 1024 * 1024,
    workers: tuple[int, ...] = (0, 2),
    batch_size: int = 1,
    seed: int = 0,
) -> dict:
    """Images/s of the training data path for each worker count (whole pass, worker start-up included)."""
    # Imported here: the data module is a LightningDataModule, and importing this module must not load Lightning.
    from fusedit.data.datamodule import EditDataModule

    with tempfile.TemporaryDirectory(prefix="fusedit-bench-data-") as tmp:
        source = "user dataset" if metadata else f"synthetic {image_size[0]}x{image_size[1]} JPEG q90"
        if metadata is None:
            metadata = make_jpeg_dataset(tmp, samples, image_size, seed)
        loader_rows = []
        dataset = None
        for num_workers in workers:
            module = EditDataModule(
                metadata,
                max_pixels=max_pixels,
                edit_max_pixels=edit_max_pixels,
                batch_size=batch_size,
                num_workers=num_workers,
                shuffle=False,
                seed=seed,
            )
            module.setup("fit")  # validation decodes every file once; not part of the timed pass
            dataset = module.train_dataset
            images = 0
            start = time.perf_counter()
            for batch in module.train_dataloader():
                images += batch["image"].shape[0] * (1 + len(batch["edit_images"]))
            seconds = time.perf_counter() - start
            loader_rows.append(
                {
                    "num_workers": num_workers,
                    "images": images,
                    "seconds": seconds,
                    "images_per_s": images / seconds,
                    "samples_per_s": len(dataset) / seconds,
                }
            )
        first = dataset.samples[0]
        target_size, edit_sizes = dataset.sizes[0]
        return {
            "source": source,
            "samples": len(dataset),
            "images_per_sample": 1 + len(first.edit_images),
            "resized_to": [list(size) for size in (target_size, *edit_sizes)],
            "batch_size": batch_size,
            "loader": loader_rows,
            "stages_ms_per_image": _stage_breakdown(dataset),
        }
