"""A local Hugging Face `datasets` dataset (`data.format=hf data.path=...`) -> the same `Record`s a metadata file gives.

`datasets` does the reading: `load_from_disk` for a `save_to_disk` folder, `load_dataset("parquet", ...)` for a
.parquet file, and `load_dataset(folder)` otherwise (imagefolder with its metadata.jsonl/csv, or a folder of
parquet files: the builder `datasets` infers). Nothing is downloaded.

An image cell is either an `Image` feature (PIL images in Python; stored as {bytes, path}) or a path string.
Image features are read without decoding: one stored as a file path (imagefolder) is used in place; one with
embedded bytes (parquet, save_to_disk) is written once to `extract_dir/<sha256>` (atomically; the same bytes
always give the same file), so that validation, the cache keys and the loaders read every image the same way.
Path strings resolve against `data.base_path` (default: the dataset folder) under the metadata file's rules
(`data.allow_absolute_paths`). Rows are numbered by dataset index: row N is `dataset[N]`.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from fusedit.data.errors import MetadataError
from fusedit.data.records import Columns, Record, split_edit_images
from fusedit.data.validation import PathRefused, resolve_path
from fusedit.io import atomic_write_path

log = logging.getLogger(__name__)

SAVED_DATASET_FILES = ("dataset_info.json", "dataset_dict.json", "state.json")
BATCH_ROWS = 64  # rows read at a time: embedded image bytes are held for one batch only


def load_local_dataset(path: Path, split: str):
    """The `datasets.Dataset` at `path` (its `split` when it holds several); `MetadataError` naming data.path."""
    try:
        import datasets
    except ImportError:
        raise MetadataError("data.format=hf needs the `datasets` package: pip install 'fusedit[hf]'") from None
    if not path.exists():
        raise MetadataError(f"data.path={path}: not found (data.format=hf reads a local dataset)")
    try:
        if path.is_dir() and any((path / name).is_file() for name in SAVED_DATASET_FILES):
            loaded = datasets.load_from_disk(str(path))
        elif path.is_file():
            builder = {".parquet": "parquet", ".arrow": "arrow"}.get(path.suffix.lower())
            if builder is None:
                raise MetadataError(f"data.path={path}: a single file must be .parquet or .arrow")
            loaded = datasets.load_dataset(builder, data_files=str(path), split=split)
        else:
            loaded = datasets.load_dataset(str(path), split=split)
    except MetadataError:
        raise
    except Exception as error:  # noqa: BLE001 - `datasets` raises many types; each means this path is unusable
        raise MetadataError(f"data.path={path}: `datasets` cannot load it ({type(error).__name__}: {error})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise MetadataError(f"data.path={path}: no split {split!r} (it has {sorted(loaded)}); set data.split")
        loaded = loaded[split]
    return loaded.flatten_indices() if loaded._indices is not None else loaded


class _Cells:
    """Turns one dataset cell into what a `Record` holds, collecting the row's problems."""

    def __init__(self, base_path: Path, extract_dir: Path | None, allow_absolute: bool):
        self.base_path, self.extract_dir, self.allow_absolute = base_path, extract_dir, allow_absolute

    def image(self, value, column: str, problems: list) -> str:
        """An image cell -> a file path ("" with a problem when unusable)."""
        if isinstance(value, dict) and value.get("bytes"):
            return self._extract(value["bytes"], value.get("path"))
        raw = value.get("path") if isinstance(value, dict) else value
        if isinstance(value, dict) and raw:  # an Image feature stored as a path: `datasets` wrote it, use it as is
            return str(Path(raw) if Path(raw).is_absolute() else self.base_path / raw)
        if not isinstance(raw, str) or not raw.strip():
            problems.append((column, "no image (empty cell)" if raw in (None, "") else "must be an image or a path"))
            return ""
        try:
            return str(resolve_path(raw.strip(), self.base_path, self.allow_absolute))
        except PathRefused as error:
            problems.append((column, f"{raw!r}: {error}"))
            return ""

    def _extract(self, data: bytes, name: str | None) -> str:
        if self.extract_dir is None:
            raise MetadataError("data.format=hf: the dataset embeds image bytes; set data.extract_dir")
        target = self.extract_dir / (hashlib.sha256(data).hexdigest() + (Path(name).suffix.lower() if name else ""))
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write_path(target) as temporary:
                temporary.write_bytes(data)
        return str(target)


def _record(row: int, cell: dict, columns: Columns, cells: _Cells) -> Record:
    problems: list[tuple[str, str]] = []
    image = cells.image(cell[columns.image], columns.image, problems)
    edits = cell.get(columns.edit_image)
    if isinstance(edits, str):  # "a.png|b.png", as in a CSV cell
        edits = split_edit_images(edits)
    edits = [] if edits is None else edits if isinstance(edits, (list, tuple)) else [edits]
    edit_images = tuple(cells.image(value, columns.edit_image, problems) for value in edits)
    prompt = cell[columns.prompt]
    if prompt is not None and not isinstance(prompt, str):
        problems.append((columns.prompt, f"must be a string, got {type(prompt).__name__}"))
    mask_value = cell.get(columns.mask) if columns.mask else None
    mask = cells.image(mask_value, columns.mask, problems) if mask_value not in (None, "") else None
    return Record(row, image, edit_images, prompt if isinstance(prompt, str) else "", tuple(problems), mask or None)


def read_hf_records(
    location: Path,
    columns: Columns,
    base_path: Path,
    split: str = "train",
    extract_dir: str | Path | None = None,
    allow_absolute_paths: bool = False,
) -> list[Record]:
    """One `Record` per row of the dataset at `location` (row = dataset index); image cells become file paths.

    Raises `MetadataError` when the dataset cannot be loaded or lacks a required column.
    """
    dataset = load_local_dataset(Path(location), split)
    found = list(dataset.column_names)
    missing = [name for name in columns.required() if name not in found]
    if missing:
        raise MetadataError(
            f"data.path={location}: missing column(s) {', '.join(map(repr, missing))}; columns found: "
            f"{', '.join(map(repr, found))}. Map them with data.columns={{image: ..., edit_image: ..., prompt: ...}}"
        )
    wanted = [name for name in (*columns.names(), columns.mask) if name in found]
    cells = _Cells(Path(base_path), Path(extract_dir) if extract_dir else None, bool(allow_absolute_paths))
    records = []
    # Arrow batches, not Python rows: Image columns stay {bytes, path}, nothing is decoded here.
    for start, batch in enumerate(dataset.select_columns(wanted).with_format("arrow").iter(BATCH_ROWS)):
        for offset, cell in enumerate(batch.to_pylist()):
            records.append(_record(start * BATCH_ROWS + offset, cell, columns, cells))
    if not records:
        raise MetadataError(f"data.path={location}: split {split!r} has no rows")
    return records
