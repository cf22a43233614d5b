"""Where results go, the side-by-side comparison sheet, and the run's JSON record. Every file is written atomically."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image, ImageDraw

from fusedit.errors import UserInputError
from fusedit.inference.inputs import IMAGE_SUFFIXES, Job

LABEL_HEIGHT = 14


class OutputPaths:
    """`output=` is a file (`out.png`: one job only) or a folder (`<name>.png` per job, one `run.json`)."""

    def __init__(self, output: str | os.PathLike, jobs: list[Job]):
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

    def image(self, job: Job) -> Path:
        if self._image is not None:
            return self._image
        # Names come from file stems (never a separator); refuse anything else so no job writes outside `folder`.
        if not job.name or job.name in (".", "..") or any(sep in job.name for sep in ("/", "\\", "\x00")):
            raise UserInputError(f"job name {job.name!r} ({job.source}) cannot be an output file name in {self.folder}")
        return self.folder / f"{job.name}.png"

    def sheet(self, job: Job) -> Path:
        image = self.image(job)
        return image.with_name(f"{image.stem}_compare.png")


def save_image(image: Image.Image, path: Path) -> None:
    from fusedit.io import atomic_write_path  # imports torch: not at module level, infer.py's preflight imports this

    with atomic_write_path(path) as tmp:
        # The temp name has no image suffix, so the format is named explicitly.
        image.save(tmp, format=(path.suffix.lstrip(".").upper().replace("JPG", "JPEG") or "PNG"))


def _fit_height(image: Image.Image, height: int) -> Image.Image:
    if image.height == height:
        return image
    width = max(1, round(image.width * height / image.height))
    return image.resize((width, height), Image.Resampling.LANCZOS)


def comparison_sheet(panels: list[tuple[str, Image.Image]]) -> Image.Image:
    """Panels side by side at the output's height, each with its label above it (input | output [| target])."""
    height = next(image for label, image in panels if label == "output").height
    fitted = [(label, _fit_height(image.convert("RGB"), height)) for label, image in panels]
    sheet = Image.new("RGB", (sum(image.width for _, image in fitted), height + LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(sheet)
    x = 0
    for label, image in fitted:
        sheet.paste(image, (x, LABEL_HEIGHT))
        draw.text((x + 2, 1), label, fill="black")
        x += image.width
    return sheet
