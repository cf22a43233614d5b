"""Check every record before training starts, and report every problem at once.

A corrupt image found at step 4,000 costs hours; found here it costs seconds. Each referenced file is really
decoded (the same `load_image` the training loader uses), once per distinct path, on a thread pool.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from fusedit.data.errors import DataValidationError
from fusedit.data.images import (
    DEFAULT_DECODE_BUDGET_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
    DecodeBudget,
    ImageTooLarge,
    configure_pil_limit,
    decode_bytes,
    load_image,
)
from fusedit.data.records import Columns, Record
from fusedit.families import edit_image_count_problem
from fusedit.regular_files import not_regular_reason

log = logging.getLogger(__name__)

ON_ERROR_CHOICES = ("raise", "skip")


@dataclass(frozen=True)
class Problem:
    row: int
    column: str
    path: str
    reason: str

    def __str__(self) -> str:
        where = f"row {self.row}"
        if self.column:
            where += f", column {self.column!r}"
        if self.path:
            where += f", path {self.path!r}"
        return f"{where}: {self.reason}"


@dataclass(frozen=True)
class Sample:
    """A record that passed validation: resolved paths and the (EXIF-oriented) size of every image."""

    row: int
    image: Path
    edit_images: tuple[Path, ...]
    prompt: str
    image_size: tuple[int, int]
    edit_sizes: tuple[tuple[int, int], ...]
    mask: Path | None = None  # same size as `image` (validated)


class PathRefused(ValueError):
    pass


def resolve_path(raw: str, base_path: Path, allow_absolute: bool = False) -> Path:
    """`raw` relative to `base_path`; refuses paths that leave `base_path` and, unless allowed, absolute ones.

    The check is lexical (`..` components), so a symlink the user placed inside `base_path` still works: the
    threat is a metadata file pointing elsewhere, not the user's own file system layout.
    """
    if not raw:
        raise PathRefused("empty path")
    if "\x00" in raw:
        raise PathRefused("path contains a NUL byte")
    if os.path.isabs(raw):
        if not allow_absolute:
            raise PathRefused("absolute path refused (set data.allow_absolute_paths=true to allow absolute paths)")
        return Path(os.path.normpath(raw))
    base = os.path.normpath(os.path.abspath(base_path))
    candidate = os.path.normpath(os.path.join(base, raw))
    relative = os.path.relpath(candidate, base)
    if relative == os.pardir or relative.startswith(os.pardir + os.sep):
        raise PathRefused(f"path escapes data.base_path ({base})")
    return Path(candidate)


def check_image(
    path: Path, max_image_pixels: int, budget: DecodeBudget | None = None, mask: bool = False
) -> tuple[int, int]:
    """Decode `path` fully; return its oriented (width, height) or raise ValueError with a one-line reason.

    Only a regular file is opened (a FIFO would block, /dev/zero never ends). With `budget`, the decode waits
    until its bytes (`decode_bytes`, from the header) fit beside the other threads' decodes. A `mask` must also
    have a pixel that is not black, read as the dataset reads it (RGB, then greyscale; fusedit.data.images): an
    all-black mask weights every token 0, so its row would add nothing to the loss, and a batch of such rows
    would train on a loss of exactly 0 without a word.
    """
    reason = not_regular_reason(path)
    if reason is not None:
        raise ValueError(reason)
    if path.stat().st_size == 0:
        raise ValueError("empty file (0 bytes)")
    try:
        with Image.open(path) as header:  # the header only: mode and size, no pixel decoded
            nbytes = decode_bytes(header.mode, *header.size)
        with budget.reserve(nbytes) if budget is not None else contextlib.nullcontext():
            image = load_image(path, max_image_pixels)
    except ImageTooLarge as error:
        raise ValueError(str(error)) from None
    except Image.DecompressionBombError as error:
        raise ValueError(f"decompression bomb refused by PIL ({error})") from None
    except UnidentifiedImageError:
        raise ValueError("not an image file PIL can read (unrecognised format or corrupt header)") from None
    except PermissionError:
        raise ValueError("cannot read file (permission denied)") from None
    except Exception as error:  # noqa: BLE001 - any decoder failure means the same thing: this row is unusable
        raise ValueError(f"corrupt or truncated image ({type(error).__name__}: {error})") from None
    if mask and image.convert("L").getextrema()[1] == 0:
        raise ValueError(
            "mask is all black (every pixel 0 = ignore): this row would add nothing to the loss; make the region "
            "to learn white, or drop the mask to train every pixel"
        )
    return image.size


def record_problems(record: Record, columns: Columns, family: str | None = None) -> list[Problem]:
    """What is wrong with `record` itself, without opening a file: its parse problems, an empty prompt, a missing
    or empty edit image entry, and more or fewer edit images than `family` takes (`fusedit.families`; None: one
    or more, the edit families' common rule)."""
    problems = [Problem(record.row, column, "", reason) for column, reason in record.problems]
    # What the reader already found wrong (no caption file, no control image, a wrong JSON type) is not reported
    # a second time as "empty prompt" or "no edit image".
    reported = {column for column, _ in record.problems}
    if columns.prompt not in reported and not record.prompt.strip():
        problems.append(Problem(record.row, columns.prompt, "", "empty prompt"))
    edits = record.edit_images
    if columns.edit_image in reported:
        return problems
    if not any(edits):  # `"edit_image": []`, or an empty CSV cell
        count_problem = edit_image_count_problem(0, family) if family else "no edit image"
        if count_problem:
            problems.append(Problem(record.row, columns.edit_image, "", count_problem))
        return problems
    raw_cell = "|".join(edits)
    for position, entry in enumerate(edits, start=1):
        if not entry:
            problems.append(
                Problem(record.row, columns.edit_image, raw_cell, f"entry {position} of {len(edits)} is empty")
            )
    count_problem = edit_image_count_problem(len(edits), family) if family else None
    if count_problem:
        problems.append(Problem(record.row, columns.edit_image, raw_cell, count_problem))
    return problems


def format_problems(metadata: Path | str, problems: list[Problem], total: int) -> str:
    rows = sorted({problem.row for problem in problems})
    lines = [f"{metadata}: {len(rows)} of {total} rows are bad:"]
    lines += [f"  {problem}" for problem in problems]
    lines.append("Fix these rows, or set data.on_error=skip to train without them.")
    return "\n".join(lines)


def _warn_duplicates(records: list[Record]) -> None:
    # Duplicates are allowed (repeating a row is a legitimate way to weight it) but are usually a mistake.
    seen: dict[tuple, list[int]] = defaultdict(list)
    for record in records:
        seen[(record.image, record.edit_images, record.prompt)].append(record.row)
    groups = [rows for rows in seen.values() if len(rows) > 1]
    if groups:
        shown = "; ".join("rows " + ", ".join(map(str, rows)) for rows in groups[:10])
        more = f" (and {len(groups) - 10} more groups)" if len(groups) > 10 else ""
        log.warning(
            "%d groups of identical rows (kept, each trains as often as it appears): %s%s", len(groups), shown, more
        )


@dataclass
class _Checked:
    """What validation learns about the records: every problem so far, and each row's resolved paths (None where
    refused) as (column, path as written, resolved path) triples, the target first."""

    problems: list[Problem]
    paths: dict[int, list[tuple[str, str, Path | None]]]


def _resolve_rows(records: list[Record], columns: Columns, base_path: Path, allow_absolute: bool, family) -> _Checked:
    """The records' own problems (`record_problems`) and every referenced path resolved (`resolve_path`)."""
    checked = _Checked([], {})
    for record in records:
        checked.problems += record_problems(record, columns, family)
        named = [(columns.image, record.image)] + [(columns.edit_image, e) for e in record.edit_images if e]
        if record.mask:
            named.append((columns.mask or "mask", record.mask))
        reported = {column for column, _ in record.problems}  # e.g. a cell the reader could not use at all
        row_paths = []
        for column, raw in named:
            if column in reported and not raw:
                row_paths.append((column, raw, None))
                continue
            try:
                row_paths.append((column, raw, resolve_path(raw, base_path, allow_absolute)))
            except PathRefused as error:
                checked.problems.append(Problem(record.row, column, raw, str(error)))
                row_paths.append((column, raw, None))
        checked.paths[record.row] = row_paths
    return checked


def _decode_all(
    paths: list[Path], max_image_pixels: int, budget_bytes: int, threads: int | None, masks: set[Path] = frozenset()
) -> dict:
    """(path, is a mask) -> oriented (width, height), or the one-line reason it cannot be used; each path decoded
    once per role (`check_image`: a mask has a rule of its own)."""
    budget = DecodeBudget(budget_bytes)
    jobs = sorted({(path, False) for path in paths} | {(path, True) for path in masks})

    def check(job: tuple[Path, bool]) -> tuple[tuple[Path, bool], tuple[int, int] | str]:
        try:
            return job, check_image(job[0], max_image_pixels, budget, mask=job[1])
        except ValueError as error:
            return job, str(error)

    with ThreadPoolExecutor(max_workers=threads or min(8, os.cpu_count() or 1)) as pool:
        return dict(pool.map(check, jobs))


def _sample(record: Record, row_paths: list, sizes: dict, columns: Columns) -> Sample | list[Problem]:
    """The Sample of a record whose files all decoded, or the problems of those that did not (or of its mask).
    `sizes`: `_decode_all`'s, keyed by (path, is a mask); the mask is the last of `row_paths`."""
    roles = [bool(record.mask) and index == len(row_paths) - 1 for index in range(len(row_paths))]
    problems = [
        Problem(record.row, column, raw, sizes[path, is_mask])
        for (column, raw, path), is_mask in zip(row_paths, roles, strict=True)
        if path is not None and isinstance(sizes[path, is_mask], str)
    ]
    if problems:
        return problems
    paths = [path for _, _, path in row_paths]
    if None in paths:  # a refused path: the row is already reported
        return []
    mask = paths.pop() if record.mask else None
    width, height = sizes[paths[0], False]
    if mask is not None and sizes[mask, True] != (width, height):
        mask_width, mask_height = sizes[mask, True]
        reason = f"mask is {mask_width}x{mask_height}, the image is {width}x{height}; a mask has the target's size"
        return [Problem(record.row, columns.mask or "mask", record.mask, reason)]
    return Sample(
        row=record.row,
        image=paths[0],
        edit_images=tuple(paths[1:]),
        prompt=record.prompt,
        image_size=(width, height),
        edit_sizes=tuple(sizes[path, False] for path in paths[1:]),
        mask=mask,
    )


def raise_or_skip(problems: list[Problem], kept: int, total: int, metadata: Path | str, on_error: str) -> None:
    """Refuse (`DataValidationError` listing every problem) unless on_error="skip" leaves `kept` rows; else warn."""
    if not problems:
        return
    problems.sort(key=lambda problem: problem.row)
    message = format_problems(metadata, problems, total)
    if on_error == "raise" or not kept:
        if on_error == "skip":
            message += "\n(data.on_error=skip, but no valid row is left)"
        raise DataValidationError(message, problems)
    bad_rows = len({problem.row for problem in problems})
    log.warning("data.on_error=skip: skipped %d of %d rows.\n%s", bad_rows, total, message)


def validate_records(
    records: list[Record],
    *,
    metadata: Path | str,
    base_path: Path | str,
    columns: Columns | None = None,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    allow_absolute_paths: bool = False,
    on_error: str = "raise",
    num_threads: int | None = None,
    family: str | None = None,
    decode_budget_bytes: int = DEFAULT_DECODE_BUDGET_BYTES,
) -> list[Sample]:
    """Validate every record; return the good ones as `Sample`s.

    `metadata` names the data in messages (the metadata file, image folder or dataset). `family`
    (`fusedit.families`, e.g. "qwen-image-edit"): judge each row's number of edit images against what that pipeline
    takes; None accepts one or more. Images are decoded on `num_threads` threads, at most `decode_budget_bytes` of
    decoded pixels at a time (`DecodeBudget`). A mask must decode, have its target's size and not be all black.

    on_error="raise": one `DataValidationError` listing every problem. on_error="skip": drop bad rows and log
    how many (still raises when no row is left).
    """
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"data.on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
    columns = columns or Columns()
    configure_pil_limit(max_image_pixels)
    _warn_duplicates(records)
    checked = _resolve_rows(records, columns, Path(base_path), allow_absolute_paths, family)
    every_path, masks = [], set()
    for record in records:
        row_paths = [path for _, _, path in checked.paths[record.row]]
        if record.mask and row_paths[-1] is not None:
            masks.add(row_paths.pop())
        every_path += [path for path in row_paths if path is not None]
    sizes = _decode_all(every_path, max_image_pixels, decode_budget_bytes, num_threads, masks)
    already_bad = {problem.row for problem in checked.problems}
    samples = []
    for record in records:
        outcome = _sample(record, checked.paths[record.row], sizes, columns)
        if isinstance(outcome, list):
            checked.problems += outcome
        elif record.row not in already_bad:
            samples.append(outcome)
    raise_or_skip(checked.problems, len(samples), len(records), metadata, on_error)
    return samples
