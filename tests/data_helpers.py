"""Builders shared by the data tests (no tests here): images and metadata files written into tmp_path."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
from PIL import Image


def save_image(path: Path, size=(48, 32), colour=(30, 120, 200), mode="RGB", **save_kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path, **save_kwargs)


def noise_png(path: Path, size=(64, 64), seed=0) -> None:
    # Noise does not compress, so truncating the file really cuts into pixel data.
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def write_csv(path: Path, rows: list[list[str]], header=("image", "edit_image", "prompt"), encoding="utf-8") -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if header is not None:
        writer.writerow(header)
    writer.writerows(rows)
    path.write_bytes(buffer.getvalue().encode(encoding))
    return path


def simple_dataset(root: Path, n=4, size=(48, 32)) -> Path:
    """n good rows: target_i.png / input_i.png with prompts 'prompt i'."""
    rows = []
    for index in range(n):
        save_image(root / f"target_{index}.png", size, (index * 40 % 256, 10, 10))
        save_image(root / f"input_{index}.png", size, (10, index * 40 % 256, 10))
        rows.append([f"target_{index}.png", f"input_{index}.png", f"prompt {index}"])
    return write_csv(root / "metadata.csv", rows)
