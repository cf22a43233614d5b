"""Where training rows come from (`data.format`): every source gives the same `Record`s, which then go through the
one validation (fusedit.data.validation), error table and buckets.

    metadata  a CSV or JSONL file (`data.metadata`), paths relative to `data.base_path` (fusedit.data.records)
    folder    same-stem target images, captions, control images and masks (`data.image_dir`, ...; fusedit.data.folder)
    hf        a local Hugging Face dataset (`data.path`: imagefolder, parquet or save_to_disk; fusedit.data.hf)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from fusedit.data.records import ROLES, Columns, Record, read_records

DATA_FORMATS = ("metadata", "folder", "hf")
# The setting each format cannot do without.
REQUIRED = {"metadata": "metadata", "folder": "image_dir", "hf": "path"}


def refuse_bad_source(hp) -> None:
    """`ValueError` for an unknown format, a format without its required setting, or with another format's
    settings. `hp`: the data module's hyperparameters or the `data` config node."""
    if hp.format not in DATA_FORMATS:
        raise ValueError(f"data.format must be one of {DATA_FORMATS}, got {hp.format!r}")
    required = REQUIRED[hp.format]
    if hp[required] is None:
        raise ValueError(f"data.format={hp.format} needs data.{required}")
    others = {"metadata": hp.metadata, "image_dir": hp.image_dir, "path": hp.path}
    stray = [key for key, value in others.items() if value is not None and key != required]
    if hp.format != "folder" and (hp.control_dirs or hp.mask_dir is not None):
        stray.append("control_dirs/mask_dir")
    if stray:
        raise ValueError(f"data.format={hp.format} reads data.{required}; data.{stray[0]} belongs to another format")
    unknown = set(hp.columns or {}) - {*ROLES, "mask"}
    if unknown:
        raise ValueError(f"data.columns takes the roles {[*ROLES, 'mask']}, got {sorted(unknown)}")


@dataclass(frozen=True)
class DataSource:
    """One configured source. `location` is what messages name; paths of its records resolve against `base_path`,
    absolute ones only when `allow_absolute` (a folder's or dataset's own files are listed absolute by fusedit)."""

    format: str
    location: Path
    base_path: Path
    allow_absolute: bool
    columns: Columns
    settings: dict

    @classmethod
    def from_settings(cls, hp) -> DataSource:
        """The source the data module's hyperparameters (`data.*`) describe."""
        names = {"image": hp.image_column, "edit_image": hp.edit_image_column, "prompt": hp.prompt_column}
        names.update(mask=hp.mask_column, **(hp.columns or {}))
        columns = Columns(**names)
        if hp.format == "metadata":
            location = Path(hp.metadata)
            base = Path(hp.base_path) if hp.base_path is not None else location.parent
            return cls("metadata", location, base, bool(hp.allow_absolute_paths), columns, {})
        if hp.format == "folder":
            settings = {"control_dirs": list(hp.control_dirs or ()), "mask_dir": hp.mask_dir}
            return cls("folder", Path(hp.image_dir), Path(hp.image_dir), True, columns, settings)
        location = Path(hp.path)
        base = Path(hp.base_path) if hp.base_path is not None else (location if location.is_dir() else location.parent)
        settings = {"split": hp.split, "extract_dir": hp.extract_dir, "allow_absolute_paths": hp.allow_absolute_paths}
        return cls("hf", location, base, True, columns, settings)

    def records(self, edit_image_optional: bool = False) -> list[Record]:
        """Every row, not yet validated; `MetadataError` for a source that cannot be read at all.
        `edit_image_optional` (a model that draws from text alone: Qwen-Image, Qwen-Image-2.1): the edit_image
        column may be left out or empty (its rows then have no edit image)."""
        columns = self.columns
        if edit_image_optional:
            columns = dataclasses.replace(columns, optional=columns.optional | {"edit_image"})
        if self.format == "metadata":
            records = read_records(self.location, columns)
        elif self.format == "folder":
            from fusedit.data.folder import read_folder_records

            records = read_folder_records(self.location, **self.settings)
        else:
            from fusedit.data.hf import read_hf_records  # imports `datasets`, only for this format

            records = read_hf_records(self.location, columns, self.base_path, **self.settings)
        if edit_image_optional:  # no column, or an empty cell (read as ("",)): no edit image
            records = [r if any(r.edit_images or ()) else dataclasses.replace(r, edit_images=()) for r in records]
        return records
