"""Folder datasets (musubi-tuner / ai-toolkit / diffusion-pipe layout) -> the same `Record`s a metadata file gives.

    data.image_dir/      a.png  a.txt  b.jpg  b.txt      targets, each with a same-stem UTF-8 caption
    data.control_dirs[i] a.png  b.webp                   edit (control) image i of each target, matched by stem
    data.mask_dir/       a.png                           optional loss masks, matched by stem

Rules (docs/data.md#folder-datasets): only the folder's own files are read (no subfolders); an image is a file
with one of `IMAGE_SUFFIXES` (any case), hidden files are skipped. A target without its caption or without its
control image in a control folder is a bad row (reported with every other problem, skipped with
data.on_error=skip); a target without a mask trains every pixel. Two images with one stem in the same folder are
refused (which one is meant is not knowable). Files nothing matches (a caption without an image, a control image
without a target, other file types) are ignored, with a warning naming the first few.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fusedit.data.errors import MetadataError
from fusedit.data.records import Record

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
CAPTION_SUFFIX = ".txt"


def images_by_stem(folder: Path, setting: str) -> dict[str, Path]:
    """stem -> image file of `folder`; `MetadataError` naming `setting` for a missing folder or a repeated stem."""
    if not folder.is_dir():
        raise MetadataError(f"{setting}={folder}: {'not a folder' if folder.exists() else 'folder not found'}")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        if path.stem in found:
            raise MetadataError(
                f"{setting}={folder}: two images named {path.stem!r} ({found[path.stem].name}, {path.name}); "
                "keep one, a stem must name one image"
            )
        found[path.stem] = path
    return found


def _caption(image: Path) -> tuple[str, tuple[str, str] | None]:
    """(caption, None) or ("", (column, problem)) for the caption file beside `image`."""
    path = image.with_suffix(CAPTION_SUFFIX)
    try:
        return path.read_bytes().decode("utf-8-sig").strip(), None
    except FileNotFoundError:
        return "", ("prompt", f"no caption file {path.name} beside {image}")
    except UnicodeDecodeError as error:
        return "", ("prompt", f"caption {path} is not valid UTF-8 (byte offset {error.start})")
    except OSError as error:
        return "", ("prompt", f"cannot read caption {path} ({error.strerror})")


def _warn_unmatched(image_dir: Path, stems: set[str], others: list[dict[str, Path]]) -> None:
    captions = {p for p in image_dir.glob("*" + CAPTION_SUFFIX) if not p.name.startswith(".")}
    unmatched = sorted(str(p) for p in captions if p.stem not in stems)
    for found in others:
        unmatched += sorted(str(path) for stem, path in found.items() if stem not in stems)
    if unmatched:
        shown = ", ".join(unmatched[:5]) + (f" (and {len(unmatched) - 5} more)" if len(unmatched) > 5 else "")
        log.warning("data.image_dir=%s: %d file(s) match no target image and are ignored: %s", image_dir,
                    len(unmatched), shown)  # fmt: skip


def read_folder_records(
    image_dir: str | Path, control_dirs: list[str | Path] = (), mask_dir: str | Path | None = None
) -> list[Record]:
    """One `Record` per target image of `image_dir`, in stem order (row = position, from 1), paths absolute.

    Raises `MetadataError` for a missing folder, a repeated stem or a target folder without images; a missing
    caption or control image is a problem of its row (validation reports it, naming the file).
    """
    image_dir = Path(image_dir)
    targets = images_by_stem(image_dir, "data.image_dir")
    if not targets:
        raise MetadataError(f"data.image_dir={image_dir}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    controls = {f"data.control_dirs[{i}]={d}": images_by_stem(Path(d), f"data.control_dirs[{i}]")
                for i, d in enumerate(control_dirs)}  # fmt: skip
    masks = images_by_stem(Path(mask_dir), "data.mask_dir") if mask_dir is not None else {}
    _warn_unmatched(image_dir, set(targets), [*controls.values(), masks])
    records = []
    for row, (stem, image) in enumerate(sorted(targets.items()), start=1):
        prompt, problem = _caption(image)
        problems = [problem] if problem else []
        edits = []
        for setting, found in controls.items():
            if stem in found:
                edits.append(str(found[stem].absolute()))
            else:
                problems.append(("edit_image", f"no control image named {stem!r} in {setting}"))
        mask = str(masks[stem].absolute()) if stem in masks else None
        records.append(Record(row, str(image.absolute()), tuple(edits), prompt, tuple(problems), mask))
    return records
