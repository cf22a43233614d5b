"""Where results go, the side-by-side comparison sheet, and the run's JSON record. Every file is written atomically."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image, ImageDraw

from fusedit.errors import UserInputError
from fusedit.inference.inputs import COMPARE_SUFFIX, IMAGE_SUFFIXES, Job

LABEL_HEIGHT = 14


class OutputPaths:
    """`output=` is a file (`out.png`: one job only) or a folder (`<name>.png` per job, one `run.json`).

    Refused here, before any model loads (UserInputError): a path that would write over an input image or target,
    an output folder that holds input images (results and `*_compare.png` sheets would mix with the inputs), and,
    unless `overwrite`, a file an earlier run wrote (image, sheet or record).
    """

    def __init__(self, output: str | os.PathLike, jobs: list[Job], overwrite: bool = False):
        output = Path(output).expanduser()
        self.single = output.suffix.lower() in IMAGE_SUFFIXES
        if self.single and len(jobs) != 1:
            raise UserInputError(
                f"output={output} names one image file but there are {len(jobs)} jobs; give a folder instead"
            )
        if self.single:
            self.folder = output.parent
            self.record = output.with_suffix(".json")
            self._image = output
        else:
            self.folder = output
            self.record = output / "run.json"
            self._image = None
        # Found now, not when the first image is saved after the model has loaded.
        if self.single and output.is_dir():
            raise UserInputError(f"output={output} is a folder; name a new image file or pass the folder itself")
        if not self.single and output.exists() and not output.is_dir():
            raise UserInputError(f"output={output} is an existing file, not a folder (give an image name like out.png)")
        existing = next(p for p in (self.folder, *self.folder.parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise UserInputError(f"output={output}: cannot write in {existing}")
        self._check_inputs_untouched(output, jobs)
        if not overwrite:
            earlier = [p for job in jobs for p in (self.image(job), self.sheet(job)) if p.exists()]
            earlier += [self.record] if self.record.exists() else []
            if earlier:
                shown = ", ".join(str(p) for p in earlier[:3]) + (
                    f" (and {len(earlier) - 3} more)" if len(earlier) > 3 else ""
                )
                raise UserInputError(
                    f"output={output} already holds results of an earlier run ({shown}); pass overwrite=true to "
                    "replace them, or another output="
                )

    def _check_inputs_untouched(self, output: Path, jobs: list[Job]) -> None:
        inputs = {path.resolve() for job in jobs for path in (*job.images, *([job.target] if job.target else []))}
        for job in jobs:
            for path in (self.image(job), self.sheet(job)):
                if path.resolve() in inputs:
                    raise UserInputError(f"output={output} would write over the input {path}; choose another output=")
        if not self.single:
            folder = self.folder.resolve()
            mixed = sorted(str(image) for job in jobs for image in job.images if image.resolve().parent == folder)
            if mixed:
                raise UserInputError(
                    f"output={output} is the folder of the input images ({mixed[0]}"
                    f"{f' and {len(mixed) - 1} more' if len(mixed) > 1 else ''}): results and comparison sheets "
                    "would mix with the inputs (and be read as inputs by the next run); choose another output="
                )

    def image(self, job: Job) -> Path:
        if self._image is not None:
            return self._image
        # Names come from file stems (never a separator); refuse anything else so no job writes outside `folder`.
        if not job.name or job.name in (".", "..") or any(sep in job.name for sep in ("/", "\\", "\x00")):
            raise UserInputError(f"job name {job.name!r} ({job.source}) cannot be an output file name in {self.folder}")
        return self.folder / f"{job.name}.png"

    def sheet(self, job: Job) -> Path:
        image = self.image(job)
        return image.with_name(f"{image.stem}{COMPARE_SUFFIX}.png")


def save_image(image: Image.Image, path: Path) -> None:
    from fusedit.io import atomic_write_path  # imports torch: not at module level, infer.py's preflight imports this

    image_format = path.suffix.lstrip(".").upper().replace("JPG", "JPEG") or "PNG"
    if image_format == "JPEG" and image.mode == "RGBA":  # Qwen-Image-2.1 decodes alpha; JPEG has none
        image = _on_white(image)
    with atomic_write_path(path) as tmp:
        # The temp name has no image suffix, so the format is named explicitly.
        image.save(tmp, format=image_format)


def _on_white(image: Image.Image) -> Image.Image:
    """An RGBA image composited over white (as diffusers shows a 2.1 RGBA reference to Qwen3-VL)."""
    white = Image.new("RGB", image.size, (255, 255, 255))
    white.paste(image, mask=image.getchannel("A"))
    return white


def _fit_height(image: Image.Image, height: int) -> Image.Image:
    if image.height == height:
        return image
    width = max(1, round(image.width * height / image.height))
    return image.resize((width, height), Image.Resampling.LANCZOS)


def comparison_sheet(panels: list[tuple[str, Image.Image]]) -> Image.Image:
    """Panels side by side at the output's height, each with its label above it (input | output [| target])."""
    height = next(image for label, image in panels if label == "output").height
    fitted = [
        (label, _fit_height(_on_white(image) if image.mode == "RGBA" else image.convert("RGB"), height))
        for label, image in panels
    ]
    sheet = Image.new("RGB", (sum(image.width for _, image in fitted), height + LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(sheet)
    x = 0
    for label, image in fitted:
        sheet.paste(image, (x, LABEL_HEIGHT))
        draw.text((x + 2, 1), label, fill="black")
        x += image.width
    return sheet
