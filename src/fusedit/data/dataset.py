"""The map-style dataset behind EditDataModule: one validated sample -> resized tensors; and its collate."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from fusedit.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    edit_size,
    load_image,
    mask_to_tensor,
    resize_edit,
    resize_target,
    target_size,
    to_tensor,
)
from fusedit.data.validation import Sample

Size = tuple[int, int]


def plan_sizes(sample: Sample, max_pixels: int, edit_max_pixels: int | None) -> tuple[Size, tuple[Size, ...]]:
    """(target size, edit sizes) a sample is resized to; also its bucket key.

    Edit images get `edit_max_pixels` of area when set (1024*1024 reproduces Qwen-Image-Edit inference);
    by default they get the target's area, so a small-resolution run stays small.
    """
    target = target_size(*sample.image_size, max_pixels)
    area = edit_max_pixels or target[0] * target[1]
    return target, tuple(edit_size(width, height, area) for width, height in sample.edit_sizes)


class EditDataset(Dataset):
    def __init__(
        self,
        samples: list[Sample],
        max_pixels: int,
        edit_max_pixels: int | None = None,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ):
        self.samples = list(samples)
        self.max_image_pixels = max_image_pixels
        self.sizes = [plan_sizes(sample, max_pixels, edit_max_pixels) for sample in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, sample: Sample, path: Path) -> Image.Image:
        try:
            return load_image(path, self.max_image_pixels)
        except Exception as error:
            # Validation decoded this file at setup; reaching here means it changed or vanished since.
            raise RuntimeError(f"row {sample.row}: {path}: cannot load image ({error})") from error

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        target, edits = self.sizes[index]
        item = {
            "image": to_tensor(resize_target(self._load(sample, sample.image), target)),
            "edit_images": [
                to_tensor(resize_edit(self._load(sample, path), size)) for path, size in zip(sample.edit_images, edits)
            ],
            "prompt": sample.prompt,
            "row": sample.row,
        }
        if sample.mask is not None:  # the same crop and resize as its target (validated to have its size)
            item["mask"] = mask_to_tensor(resize_target(self._load(sample, sample.mask), target))
        return item


def collate(items: list[dict]) -> dict:
    """Stack one bucket's items: {"image": [B,3,H,W], "edit_images": [per slot: [B,3,h,w]], "prompt", "row"}, and
    "mask": [B,1,H,W] in [0, 1] when any item has one (all ones for those without)."""
    shapes = {(tuple(item["image"].shape), tuple(tuple(e.shape) for e in item["edit_images"])) for item in items}
    if len(shapes) != 1:
        rows = [item["row"] for item in items]
        raise ValueError(
            f"batch of rows {rows} mixes image sizes {sorted(shapes)}; batches must come from BucketBatchSampler"
        )
    slots = len(items[0]["edit_images"])
    batch = {
        "image": torch.stack([item["image"] for item in items]),
        "edit_images": [torch.stack([item["edit_images"][slot] for item in items]) for slot in range(slots)],
        "prompt": [item["prompt"] for item in items],
        "row": [item["row"] for item in items],
    }
    if any("mask" in item for item in items):
        full = torch.ones_like(batch["image"][0, :1])
        batch["mask"] = torch.stack([item.get("mask", full) for item in items])
    return batch
