"""A small generated dataset with a visible, learnable edit, so `python train.py` runs with no data of its own.

Each input (edit_image) has a square and a circle in random colours and places on a plain background; its target
(image) is the same picture with the shape named by the prompt turned red. Same arguments -> same bytes. For a
text-to-image model the targets alone are the data, each with a prompt describing it (`metadata_t2i.csv`).
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

from fusedit.data.records import write_metadata_csv
from fusedit.io import atomic_write_path

RED = (220, 30, 30)
PROMPTS = {"square": "make the square red", "circle": "make the circle red"}
T2I_PROMPTS = {"square": "a red square beside a circle", "circle": "a red circle beside a square"}
T2I_METADATA = "metadata_t2i.csv"


def _colour(rng: random.Random, low: int, high: int) -> tuple[int, int, int]:
    # Green/blue dominant, so no shape starts out red.
    return (rng.randint(low, high) // 3, rng.randint(low, high), rng.randint(low, high))


def _draw(size: int, background, square: tuple, circle: tuple) -> Image.Image:
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    (sx, sy, sside, scolour), (cx, cy, cdiameter, ccolour) = square, circle
    draw.rectangle((sx, sy, sx + sside - 1, sy + sside - 1), fill=scolour)
    draw.ellipse((cx, cy, cx + cdiameter - 1, cy + cdiameter - 1), fill=ccolour)
    return image


def _save_png(image: Image.Image, path: Path) -> None:
    with atomic_write_path(path) as tmp:
        image.save(tmp, format="PNG")


def make_sample_dataset(out_dir: str | Path, n: int = 12, size: int = 64, seed: int = 0) -> Path:
    """Write `n` (edit_image, image, prompt) triples of `size`x`size` PNGs and a metadata.csv; return its path.
    Also writes `metadata_t2i.csv`: the targets with prompts describing them, empty edit_image cells."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    out = Path(out_dir)
    rng = random.Random(seed)
    rows, t2i_rows = [], []
    shape_size = max(4, size // 3)
    half = size // 2
    span = max(1, half - shape_size)

    def place(left: bool) -> tuple[int, int]:
        x0 = 0 if left else half
        return x0 + rng.randrange(span), rng.randrange(max(1, size - shape_size))

    for index in range(n):
        background = tuple(rng.randint(200, 250) for _ in range(3))
        # Square in one half, circle in the other, so they never overlap.
        square_left = rng.random() < 0.5
        square_xy, circle_xy = place(square_left), place(not square_left)
        square = (*square_xy, shape_size, _colour(rng, 60, 200))
        circle = (*circle_xy, shape_size, _colour(rng, 60, 200))
        target_shape = "square" if index % 2 == 0 else "circle"
        edited_square = (*square[:3], RED) if target_shape == "square" else square
        edited_circle = (*circle[:3], RED) if target_shape == "circle" else circle

        edit_name, image_name = f"images/input_{index:03d}.png", f"images/target_{index:03d}.png"
        _save_png(_draw(size, background, square, circle), out / edit_name)
        _save_png(_draw(size, background, edited_square, edited_circle), out / image_name)
        rows.append((image_name, edit_name, PROMPTS[target_shape]))
        t2i_rows.append((image_name, "", T2I_PROMPTS[target_shape]))

    write_metadata_csv(out / T2I_METADATA, t2i_rows)
    return write_metadata_csv(out / "metadata.csv", rows)


SAMPLE_DIR = "sample-data"


def default_metadata(cache_dir: str | Path, text_to_image: bool = False) -> Path:
    """The generated sample dataset used when `data.metadata` is null (created under `cache_dir` on first use);
    `text_to_image`: its text-to-image rows (`metadata_t2i.csv`)."""
    folder = Path(cache_dir) / SAMPLE_DIR
    metadata = folder / (T2I_METADATA if text_to_image else "metadata.csv")
    if not metadata.is_file():
        make_sample_dataset(folder)
    return metadata


def fill_demo_paths(cfg) -> None:
    """Set a composed train config's null `model.path` / `data.metadata` to the tiny demo pipeline and sample data
    (created under `paths.cache_dir` on first use), in place; a text-to-image `model.path` gets the sample data's
    text-to-image rows. The one rule train.py, `fusedit cache` and `fusedit plan` share for "no model / no data
    given"."""
    from omegaconf import open_dict

    from fusedit.families import TEXT_TO_IMAGE, folder_family
    from fusedit.tiny import default_model_path  # torch-heavy; only when a demo path is really needed

    with open_dict(cfg):
        if cfg.model.path is None:
            cfg.model.path = str(default_model_path(cfg.paths.cache_dir))
        if cfg.data.get("format", "metadata") == "metadata" and cfg.data.metadata is None:
            text_to_image = folder_family(cfg.model.path) == TEXT_TO_IMAGE
            cfg.data.metadata = str(default_metadata(cfg.paths.cache_dir, text_to_image))
