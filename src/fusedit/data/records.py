"""Read the metadata file (CSV or JSONL) into plain records.

A record keeps the row number a user sees in an editor (CSV header = row 1, so the first data row is row 2;
JSONL line N = row N) so that every later error can point at it. Paths stay as written; `validation` resolves
them against `base_path`, because refusing a path is a validation decision, not a parsing one.

Training needs all three columns. A reader that can do without one (inference: the target is only shown on the
comparison sheet) declares it in `Columns.optional`: a column absent from the file is then None on every record,
while a present column keeps the usual rules (an empty CSV cell is "", a wrong JSON type is a problem of that row).
In JSONL, where "absent" can be per line, an optional field missing from a line or set to null is None there.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from fusedit.data.errors import MetadataError
from fusedit.regular_files import not_regular_reason

EDIT_IMAGE_SEPARATOR = "|"


@dataclass(frozen=True)
class Record:
    row: int
    # None only for a column declared optional (Columns.optional) that has no value here.
    image: str | None
    edit_images: tuple[str, ...] | None
    prompt: str | None
    # Problems found while parsing this row (a short CSV line, a JSON value of the wrong type): validation reports
    # them with everything else instead of stopping at the first.
    problems: tuple[tuple[str, str], ...] = field(default=())
    # The loss mask image (white = learn, black = ignore; docs/data.md#masked-loss), None when the row has none.
    mask: str | None = None


ROLES = ("image", "edit_image", "prompt")


@dataclass(frozen=True)
class Columns:
    """The column name of each role, and the roles (`ROLES`) a file may leave out (see the module docstring).

    An optional role named None is not read at all: None on every record, whatever the file holds. `mask` is
    always optional (a file without that column trains every pixel); None does not read it.
    """

    image: str | None = "image"
    edit_image: str | None = "edit_image"
    prompt: str | None = "prompt"
    optional: frozenset[str] = frozenset()
    mask: str | None = "mask"

    def __post_init__(self) -> None:
        # A bare string would be read as a set of letters.
        if isinstance(self.optional, str) or not frozenset(self.optional) <= set(ROLES):
            raise ValueError(f"Columns.optional takes role names from {ROLES}, got {self.optional!r}")
        object.__setattr__(self, "optional", frozenset(self.optional))
        unnamed = [role for role in ROLES if getattr(self, role) is None and role not in self.optional]
        if unnamed:
            raise ValueError(f"Columns: {unnamed} have no column name; only an optional role can be None")

    def names(self) -> tuple[str | None, str | None, str | None]:
        return (self.image, self.edit_image, self.prompt)

    def required(self) -> list[str]:
        return [getattr(self, role) for role in ROLES if role not in self.optional]


def _decode(path: Path, raw: bytes) -> str:
    try:
        # utf-8-sig: spreadsheet programs prepend a BOM that would otherwise become part of the first column name.
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        bad = raw[error.start : error.start + 4]
        raise MetadataError(
            f"{path}: not valid UTF-8 at byte offset {error.start} (line {line}, bytes {bad!r}). "
            "Re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 in.csv > out.csv`)."
        ) from None


def split_edit_images(value: str) -> tuple[str, ...]:
    """`a.png|b.png` -> ("a.png", "b.png"): Qwen-Image-Edit-2509 takes several input images."""
    return tuple(part.strip() for part in value.split(EDIT_IMAGE_SEPARATOR))


def _missing_columns(path: Path, found: list[str], columns: Columns) -> None:
    missing = [name for name in columns.required() if name not in found]
    if missing:
        raise MetadataError(
            f"{path}: missing column(s) {', '.join(repr(m) for m in missing)}; columns found: "
            f"{', '.join(repr(f) for f in found) or '(none)'}. Rename them in the file or set "
            "data.image_column / data.edit_image_column / data.prompt_column."
        )


def _read_csv(path: Path, text: str, columns: Columns) -> list[Record]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise MetadataError(f"{path}: the file is empty; expected a header row with {list(columns.names())}") from None
    except csv.Error as error:
        raise MetadataError(f"{path}: line 1: not valid CSV ({error})") from None
    header = [name.strip() for name in header]
    _missing_columns(path, header, columns)
    position = {name: header.index(name) for name in (*columns.names(), columns.mask) if name in header}
    records = []
    line_end = reader.line_num
    while True:
        row = line_end + 1  # where this record starts, as an editor numbers lines
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as error:
            raise MetadataError(f"{path}: line {reader.line_num}: not valid CSV ({error})") from None
        line_end = reader.line_num
        if not values or all(not value.strip() for value in values):
            continue  # blank lines, common at the end of hand-written files
        problems = []
        if len(values) != len(header):
            problems.append(("", f"has {len(values)} fields, the header has {len(header)}"))
        # An absent (optional) column is None; a present one gives its cell, "" when the row is short.
        cell = {name: values[index] if index < len(values) else "" for name, index in position.items()}
        image, edit, prompt = (cell.get(name) for name in columns.names())
        mask = (cell.get(columns.mask) or "").strip() or None  # an empty mask cell: this row trains every pixel
        records.append(
            Record(
                row=row,
                image=None if image is None else image.strip(),
                edit_images=None if edit is None else split_edit_images(edit),
                prompt=prompt,
                problems=tuple(problems),
                mask=mask,
            )
        )
    if not records:
        raise MetadataError(f"{path}: has a header but no data rows")
    return records


def _read_jsonl(path: Path, text: str, columns: Columns) -> list[Record]:
    objects: list[tuple[int, dict]] = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as error:
            raise MetadataError(f"{path}: line {line_number}: not valid JSON ({error.msg})") from None
        if not isinstance(obj, dict):
            raise MetadataError(f"{path}: line {line_number}: expected a JSON object, got {type(obj).__name__}")
        objects.append((line_number, obj))
    if not objects:
        raise MetadataError(f"{path}: the file is empty; expected one JSON object per line")
    found = sorted({key for _, obj in objects for key in obj})
    _missing_columns(path, found, columns)

    def value(obj: dict, role: str) -> tuple[object, bool]:
        """(value, present); an optional field missing from the line or null is None, a required one is ""."""
        name, optional = getattr(columns, role), role in columns.optional
        if name in obj and not (optional and obj[name] is None):
            return obj[name], True
        return (None if optional else ""), False

    records = []
    for line_number, obj in objects:
        problems = []
        for name in columns.required():
            if name not in obj:
                problems.append((name, "field missing on this line"))
        edit, present = value(obj, "edit_image")
        if not present:
            edit_images = None if edit is None else split_edit_images(edit)
        elif isinstance(edit, list) and all(isinstance(item, str) for item in edit):
            edit_images = tuple(item.strip() for item in edit)
        elif isinstance(edit, str):
            edit_images = split_edit_images(edit)
        else:
            problems.append((columns.edit_image, "must be a string or a list of strings"))
            edit_images = ()
        (image, image_present), (prompt, prompt_present) = value(obj, "image"), value(obj, "prompt")
        if image_present and not isinstance(image, str):
            problems.append((columns.image, "must be a string"))
            image = ""
        if prompt_present and not isinstance(prompt, str):
            problems.append((columns.prompt, "must be a string"))
            prompt = ""
        image = image.strip() if isinstance(image, str) else image
        mask = obj.get(columns.mask) if columns.mask else None
        if mask is not None and not isinstance(mask, str):
            problems.append((columns.mask, "must be a string (a path) or null"))
            mask = None
        mask = (mask or "").strip() or None
        records.append(Record(line_number, image, edit_images, prompt, tuple(problems), mask))
    return records


def read_records(path: str | Path, columns: Columns | None = None) -> list[Record]:
    """Parse a `.csv` or `.jsonl` metadata file. Raises `MetadataError` for file-level problems (among them a
    missing column that `columns` does not declare optional)."""
    path = Path(path)
    columns = columns or Columns()
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise MetadataError(f"{path}: unsupported metadata format {suffix!r}; use .csv or .jsonl")
    reason = not_regular_reason(path)  # a FIFO would block read_bytes, /dev/zero would never end
    if reason == "file not found":
        raise MetadataError(f"{path}: metadata file not found")
    if reason is not None:
        raise MetadataError(f"{path}: {reason}; the metadata must be a .csv or .jsonl file")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise MetadataError(f"{path}: metadata file not found") from None
    except OSError as error:
        raise MetadataError(f"{path}: cannot read metadata file ({error.strerror})") from None
    text = _decode(path, raw)
    if suffix == ".csv":
        return _read_csv(path, text, columns)
    return _read_jsonl(path, text, columns)


def write_metadata_csv(path: str | Path, rows: list[tuple[str, str, str]], columns: Columns | None = None) -> Path:
    """Write (image, edit_image, prompt) rows as the metadata CSV `read_records` reads, atomically."""
    from fusedit.io import write_text_atomic  # imports torch; reading a metadata file (infer's preflight) must not

    columns = columns or Columns()
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([columns.image, columns.edit_image, columns.prompt])
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())
    return Path(path)
