"""What to generate: one image, several images (one edit of them all), a folder, or a CSV/JSONL file.

A CSV is the training metadata format (`fusedit.data`): `edit_image` is the input (several joined by `|` for
Qwen-Image-Edit-2509/2511), `prompt` the instruction, and `image` the target, which is optional here and, when
present, is put on the comparison sheet. Relative paths are relative to the CSV's folder. A row without an input
image is a text-to-image job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from fusedit.errors import UserFileNotFoundError, UserInputError
from fusedit.regular_files import not_regular_reason

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
TABLE_SUFFIXES = (".csv", ".jsonl")


@dataclass(frozen=True)
class Job:
    name: str  # output file stem, unique within a run
    prompt: str
    images: tuple[Path, ...] = ()  # edit inputs; empty means text-to-image
    target: Path | None = None
    source: str = ""  # where the job came from, for error messages and the record
    extra: dict = field(default_factory=dict)


COMPARE_SUFFIX = "_compare"  # `<name>_compare.png`: the comparison sheet written beside `<name>.png`


def _image_files(folder: Path) -> list[Path]:
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    stems = {p.stem for p in images}
    # A folder of earlier results: its comparison sheets are not inputs (only a sheet beside its image is skipped).
    return [p for p in images if not (p.stem.endswith(COMPARE_SUFFIX) and p.stem[: -len(COMPARE_SUFFIX)] in stems)]


def unique_name(stem: str, taken: set[str]) -> str:
    """`stem`, or `stem_2`, `stem_3`, ... the first not in `taken`; added to `taken`."""
    name, n = stem, 1
    while name in taken:
        n += 1
        name = f"{stem}_{n}"
    taken.add(name)
    return name


def _require_regular(path: Path, what: str) -> None:
    reason = not_regular_reason(path)
    if reason == "file not found":
        raise UserFileNotFoundError(f"{what} {path} does not exist".replace("= ", "="))
    if reason is not None:
        raise UserInputError(f"{what} {path} {reason}".replace("= ", "="))


def _need_prompt(prompt: str | None, where: str) -> str:
    if prompt is None or not str(prompt).strip():
        raise UserInputError(f'{where}: no prompt; pass prompt="..."')
    return str(prompt)


def _table_jobs(path: Path, prompt: str | None, columns) -> list[Job]:
    from fusedit.data.records import Columns, read_records
    from fusedit.data.validation import PathRefused, resolve_path

    input_column, prompt_column = columns.get("input_column", "edit_image"), columns.get("prompt_column", "prompt")
    target_column = columns.get("target_column", "image") or None
    # Without a target (no such column in the file, or target_column null) the sheet shows input | output only.
    records = read_records(path, Columns(target_column, input_column, prompt_column, optional={"image"}))
    base = path.parent
    allow_absolute = bool(columns.get("allow_absolute_paths", False))
    jobs, taken, problems = [], set(), []

    def inside(value: str, column: str, where: str) -> Path | None:
        # The same rule as training data (fusedit.data): a table cannot reach files outside its own folder.
        try:
            return resolve_path(value, base, allow_absolute)
        except PathRefused as error:
            reason = str(error).replace("data.base_path", "the CSV's folder").replace("data.", "csv.")
            problems.append(f"{where} column {column!r}: path {value!r} refused: {reason}")
            return None

    for record in records:
        where = f"{path} row {record.row}"
        for column, message in record.problems:
            problems.append(f"{where}{f' column {column!r}' if column else ''}: {message}")
        entries = record.edit_images
        if any(entries) and not all(entries):  # "a.png|": an empty entry in a list (no entry at all: text-to-image)
            problems.append(f"{where} column {input_column!r}: {'|'.join(entries)!r} has an empty entry")
        resolved = (inside(value, input_column, where) for value in entries if value)
        images = tuple(image for image in resolved if image is not None)
        for image in images:
            reason = not_regular_reason(image)
            if reason is not None:
                what = "not found" if reason == "file not found" else reason
                problems.append(f"{where} column {input_column!r}: image {image} {what}")
        row_prompt = record.prompt if record.prompt.strip() else prompt
        if row_prompt is None or not str(row_prompt).strip():
            problems.append(f"{where} column {prompt_column!r}: empty prompt and no prompt= given")
        target = inside(record.image, target_column, where) if record.image else None
        if target is not None and (reason := not_regular_reason(target)) is not None:
            what = "not found" if reason == "file not found" else reason
            problems.append(f"{where} column {target_column!r}: target {target} {what}")
        stem = f"row{record.row:04d}" + (f"_{images[0].stem}" if images else "")
        jobs.append(Job(unique_name(stem, taken), str(row_prompt or ""), images, target, where, {"row": record.row}))
    if problems:
        raise UserInputError(f"{path}: {len(problems)} problem(s):\n  " + "\n  ".join(problems[:20]))
    return jobs


def collect_jobs(source, prompt: str | None, columns: dict | None = None, name: str = "t2i") -> list[Job]:
    """Jobs for `input=` (None, an image, a list of images, a folder, or a .csv/.jsonl file)."""
    columns = dict(columns or {})
    if source is None or source == "":
        return [Job(name, _need_prompt(prompt, "text-to-image (no input=)"), source="prompt")]
    if isinstance(source, (list, tuple)) or (
        not isinstance(source, (str, os.PathLike)) and hasattr(source, "__iter__")
    ):
        images = tuple(Path(str(item)).expanduser() for item in source)
        if not images:
            raise UserInputError("input= is an empty list")
        for image in images:
            _require_regular(image, "input image")
        return [Job(images[0].stem, _need_prompt(prompt, "input"), images, source="input list")]
    path = Path(str(source)).expanduser()
    if not path.exists():
        raise UserFileNotFoundError(f"input={path} does not exist")
    if path.is_dir():
        files = _image_files(path)
        if not files:
            raise UserInputError(f"input={path} is a folder without images ({', '.join(IMAGE_SUFFIXES)})")
        text = _need_prompt(prompt, f"input folder {path}")
        taken: set[str] = set()
        return [Job(unique_name(file.stem, taken), text, (file,), source=str(file)) for file in files]
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES or suffix in TABLE_SUFFIXES:
        _require_regular(path, "input=")  # only regular files are opened: a FIFO would block the preflight
    if suffix in TABLE_SUFFIXES:
        return _table_jobs(path, prompt, columns)
    if suffix in IMAGE_SUFFIXES:
        return [Job(path.stem, _need_prompt(prompt, f"input {path}"), (path,), source=str(path))]
    raise UserInputError(
        f"input={path}: unsupported file type {suffix!r}; give an image ({', '.join(IMAGE_SUFFIXES)}), a folder, "
        "or a .csv / .jsonl file"
    )


def unreadable_images(jobs: list[Job]) -> list[str]:
    """`cannot read image X: why` for every input or target image of `jobs` whose header PIL cannot parse.

    Only headers are read (PIL decodes lazily), so a folder of many images is checked in well under a second; the
    pixels are decoded by `load_rgb` when the job runs.
    """
    from PIL import Image

    problems = []
    for path in dict.fromkeys(image for job in jobs for image in (*job.images, job.target) if image is not None):
        try:
            with Image.open(path):
                pass
        except (OSError, Image.DecompressionBombError) as error:
            problems.append(f"cannot read image {path}: {error}")
    return problems


def load_rgb(path: Path):
    """An input or target image as RGB with its EXIF orientation applied (fusedit.data's decoder and size guard)."""
    from fusedit.data.images import load_image

    try:
        return load_image(path)
    except (OSError, ValueError) as error:
        raise UserInputError(f"cannot read image {path}: {error}") from None
