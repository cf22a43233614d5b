"""Decode, orient, convert and resize images, and turn them into tensors.

Two resize rules, because the two roles differ:
- the target (the edited result) keeps its aspect, is never upscaled past `max_pixels`, and gets sides that are
  multiples of 16 (VAE factor 8 x 2x2 patches) by a centred crop, so no pixels are distorted;
- edit images follow Qwen-Image-Edit's pipeline exactly (`calculate_dimensions`: the area is fixed, sides are
  rounded to multiples of 32, and the image is stretched to that size, not cropped), so training sees the same
  conditioning geometry as inference.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:
    import torch

DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
TARGET_MULTIPLE = 16
EDIT_MULTIPLE = 32

_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N"}
# Rows converted per slice in `to_rgb`'s 16-bit path: bounds its temporary arrays to a few MB at any width.
_SIXTEEN_BIT_ROWS = 256
# Decoded images validation may hold at once, in bytes (see `DecodeBudget`).
DEFAULT_DECODE_BUDGET_BYTES = 2 * 1024**3


class ImageTooLarge(ValueError):
    pass


def configure_pil_limit(max_image_pixels: int) -> None:
    """Let PIL open images up to `data.max_image_pixels` when a user allows more than PIL's default (~89 MP).

    `open_image` enforces the limit itself, right after reading the header, so PIL's guard (a warning above its
    limit, an error above twice that) is only a backstop. Its limit is only ever raised here, never lowered: it is
    process-wide, and other code in the process may rely on it.
    """
    if Image.MAX_IMAGE_PIXELS is not None and max_image_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = int(max_image_pixels)


def decode_bytes(mode: str, width: int, height: int) -> int:
    """Bytes that decoding a `mode` image of `width` x `height` and converting it to RGB holds at its peak.

    The decoded pixels as PIL stores them (1 byte for "L"/"P"/"1", 2 for 16-bit greyscale, 4 for everything
    else: PIL keeps 3-band images in 4 bytes, mode "I" is 32-bit) plus the RGB result (4 bytes a pixel). Pixels
    alone undercount: a 16-bit greyscale PNG of 49 MP is under the default pixel limit and decodes to 98 MB more
    than an 8-bit one.
    """
    per_pixel = 1 if mode in ("1", "L", "P") else 2 if mode in _SIXTEEN_BIT_MODES else 4
    return width * height * (per_pixel + 4)


class DecodeBudget:
    """Bounds the bytes of the images decoded at the same time by several threads (validation decodes 8 at once).

    `reserve(n)` waits until `n` bytes fit under `capacity`; an image larger than the whole budget waits until it
    is alone and then runs (never a deadlock, and one image at a time is the least memory a check can take).
    """

    def __init__(self, capacity: int = DEFAULT_DECODE_BUDGET_BYTES):
        self.capacity = capacity
        self.in_use = 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        with self._changed:
            self._changed.wait_for(lambda: self.in_use == 0 or self.in_use + nbytes <= self.capacity)
            self.in_use += nbytes
        try:
            yield
        finally:
            with self._changed:
                self.in_use -= nbytes
                self._changed.notify_all()


def open_image(path: str | os.PathLike, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Open and fully decode `path`, refusing images over `max_image_pixels` before decoding any pixel."""
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as error:
        raise ImageTooLarge(f"decompression bomb refused by PIL ({error})") from None
    width, height = image.size
    if width * height > max_image_pixels:
        image.close()
        raise ImageTooLarge(
            f"{width}x{height} = {width * height:,} pixels exceeds data.max_image_pixels={max_image_pixels:,} "
            "(possible decompression bomb; raise the limit if the image is genuine)"
        )
    # `Image.open` reads only the header; truncation and corrupt data only show while decoding.
    image.load()
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency is composited on white (the usual look of a transparent image)."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "I":
        # PIL's convert("RGB") clips 16-bit values at 255, turning most 16-bit images white: rescale instead.
        # Mode "I" is how PIL opens 16-bit greyscale PNG/TIFF, so it gets the 16-bit range too.
        # In slices of rows with integer arithmetic (round(v * 255 / 65535)): a float64 copy of a whole 49 MP
        # image took ~1.3 GB; this holds the result and a few MB.
        out = np.empty((image.height, image.width), dtype=np.uint8)
        for top in range(0, image.height, _SIXTEEN_BIT_ROWS):
            rows = image.crop((0, top, image.width, min(image.height, top + _SIXTEEN_BIT_ROWS)))
            values = np.clip(np.asarray(rows, dtype=np.int64), 0, 65535)
            out[top : top + rows.height] = (values * 255 + 32767) // 65535
        return Image.fromarray(out, mode="L").convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | os.PathLike, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode `path`, apply its EXIF orientation and return it as RGB."""
    image = open_image(path, max_image_pixels)
    try:
        rgb = to_rgb(ImageOps.exif_transpose(image))
        # The result must outlive the file handle closed below.
        return image.copy() if rgb is image else rgb
    finally:
        image.close()


def target_size(width: int, height: int, max_pixels: int, multiple: int = TARGET_MULTIPLE) -> tuple[int, int]:
    """Size for a target image: aspect kept, area <= max_pixels, sides multiples of `multiple`, never upscaled
    (except a side shorter than `multiple`, which becomes `multiple`)."""
    if max_pixels < multiple * multiple:
        raise ValueError(f"max_pixels={max_pixels} is below the smallest possible image ({multiple}x{multiple})")
    scale = min(1.0, math.sqrt(max_pixels / (width * height)))
    out_w = max(multiple, int(width * scale) // multiple * multiple)
    out_h = max(multiple, int(height * scale) // multiple * multiple)
    # A very elongated image has its short side raised to `multiple`; take that area back from the long side.
    if out_w * out_h > max_pixels:
        if out_w >= out_h:
            out_w = max(multiple, max_pixels // out_h // multiple * multiple)
        else:
            out_h = max(multiple, max_pixels // out_w // multiple * multiple)
    return out_w, out_h


def calculate_dimensions(target_area: float, ratio: float, multiple: int = EDIT_MULTIPLE) -> tuple[int, int]:
    """diffusers' Qwen-Image-Edit `calculate_dimensions` (width, height), with sides kept >= `multiple`.

    Like the pipeline it rounds to the nearest multiple, so the area may exceed `target_area` by under one row
    or column of `multiple` pixels.
    """
    width = math.sqrt(target_area * ratio)
    height = width / ratio
    out_w = max(multiple, round(width / multiple) * multiple)
    out_h = max(multiple, round(height / multiple) * multiple)
    # Same guard as `target_size`: an extreme ratio must not inflate the area through the minimum side.
    if out_w * out_h > target_area + multiple * max(out_w, out_h):
        if out_w >= out_h:
            out_w = max(multiple, round(target_area / out_h / multiple) * multiple)
        else:
            out_h = max(multiple, round(target_area / out_w / multiple) * multiple)
    return out_w, out_h


def edit_size(width: int, height: int, area: float) -> tuple[int, int]:
    """Size for an edit (input) image of `width`x`height` at a fixed area, as Qwen-Image-Edit computes it."""
    return calculate_dimensions(area, width / height)


def resize_target(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Centre-crop to the aspect of `size`, then resize: one resampling pass and no distortion."""
    out_w, out_h = size
    width, height = image.size
    if width * out_h > height * out_w:  # wider than the target: crop left and right
        crop_w = height * out_w / out_h
        box = ((width - crop_w) / 2, 0.0, (width + crop_w) / 2, float(height))
    else:
        crop_h = width * out_h / out_w
        box = (0.0, (height - crop_h) / 2, float(width), (height + crop_h) / 2)
    if image.size == size and box == (0.0, 0.0, float(width), float(height)):
        return image
    return image.resize(size, Image.Resampling.LANCZOS, box=box)


def resize_edit(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    # The Qwen-Image-Edit pipeline stretches (VaeImageProcessor.resize, Lanczos); do the same.
    return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor (3, H, W) in [-1, 1], the range the Qwen-Image VAE expects."""
    # Imported here: inference's preflight resolves and opens CSV images with this package, before torch loads.
    import torch

    channels_first = np.asarray(image.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)
    return torch.from_numpy(channels_first.copy()).to(torch.float32).div_(127.5).sub_(1.0)


def mask_to_tensor(image: Image.Image) -> torch.Tensor:
    """Mask image (any mode; its greyscale: white = 1 = learn, black = 0 = ignore) -> float32 [1, H, W] in [0, 1]."""
    import torch

    grey = np.asarray(image.convert("L"), dtype=np.uint8)
    return torch.from_numpy(grey.copy()).to(torch.float32).div_(255.0).unsqueeze(0)


def to_pil(tensor: torch.Tensor) -> Image.Image:
    """(3, H, W) tensor in [-1, 1] -> RGB PIL image; the text encoder (Qwen2.5-VL) takes edit images as PIL."""
    array = ((tensor.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte()
    return Image.fromarray(array.permute(1, 2, 0).numpy(), mode="RGB")


__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "ImageTooLarge",
    "calculate_dimensions",
    "configure_pil_limit",
    "edit_size",
    "load_image",
    "mask_to_tensor",
    "open_image",
    "resize_edit",
    "resize_target",
    "target_size",
    "to_pil",
    "to_rgb",
    "to_tensor",
]
