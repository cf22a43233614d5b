"""Folder and Hugging Face datasets (data.format=folder|hf) give the rows a metadata file gives: the same
validation, the same error table, the same buckets."""

from __future__ import annotations

import json
import logging

import pytest
from PIL import Image

from fusedit.data import DataValidationError, EditDataModule, MetadataError
from tests.data_helpers import save_image, write_csv

SIZES = [(48, 32), (32, 48), (48, 32)]


def pairs(root):
    """Three (target, edit, prompt) rows as files: targets/, controls/, and the same rows as metadata.csv."""
    rows = []
    for index, size in enumerate(SIZES):
        save_image(root / "targets" / f"s{index}.png", size, (index * 60, 10, 10))
        save_image(root / "controls" / f"s{index}.jpg", size, (10, index * 60, 10))
        (root / "targets" / f"s{index}.txt").write_text(f"make it red {index}\n")
        rows.append([f"targets/s{index}.png", f"controls/s{index}.jpg", f"make it red {index}"])
    return write_csv(root / "metadata.csv", rows)


def loaded(**kwargs) -> EditDataModule:
    module = EditDataModule(max_pixels=32 * 32, seed=0, **kwargs)
    module.setup("fit")
    return module


def summary(module: EditDataModule):
    samples = module.train_dataset.samples
    return [(s.image.name, [e.name for e in s.edit_images], s.prompt) for s in samples], module.train_dataset.sizes


def test_folder_dataset_gives_the_csv_rows_and_buckets(tmp_path):
    csv = loaded(metadata=pairs(tmp_path))
    folder = loaded(format="folder", image_dir=tmp_path / "targets", control_dirs=[tmp_path / "controls"])
    assert summary(folder) == summary(csv)
    assert len({size for size in folder.train_dataset.sizes}) == 2  # two aspect buckets, as from the CSV


def test_folder_dataset_reports_missing_caption_and_control_in_one_table(tmp_path, caplog):
    pairs(tmp_path)
    (tmp_path / "targets" / "s0.txt").unlink()
    (tmp_path / "controls" / "s2.jpg").unlink()
    save_image(tmp_path / "controls" / "orphan.png")  # matches no target: ignored, with a warning
    (tmp_path / "targets" / "notes.json").write_text("{}")  # not an image or caption: ignored
    settings = dict(format="folder", image_dir=tmp_path / "targets", control_dirs=[tmp_path / "controls"])
    with pytest.raises(DataValidationError) as error:
        loaded(**settings)
    message = str(error.value)
    assert "2 of 3 rows are bad" in message
    assert "no caption file s0.txt" in message and str(tmp_path / "targets" / "s0.png") in message
    assert "no control image named 's2' in data.control_dirs[0]" in message
    assert "empty prompt" not in message and "no edit image" not in message  # each problem said once
    with caplog.at_level(logging.WARNING):
        module = loaded(on_error="skip", **settings)
    assert [s.image.name for s in module.train_dataset.samples] == ["s1.png"]
    assert "orphan.png" in caplog.text


def test_folder_dataset_refuses_two_images_with_one_stem(tmp_path):
    pairs(tmp_path)
    save_image(tmp_path / "targets" / "s1.webp")
    with pytest.raises(MetadataError, match=r"data.image_dir=.*two images named 's1' \(s1.png, s1.webp\)"):
        loaded(format="folder", image_dir=tmp_path / "targets", control_dirs=[tmp_path / "controls"])


def test_folder_settings_are_checked_at_construction(tmp_path):
    with pytest.raises(ValueError, match="data.format=folder needs data.image_dir"):
        EditDataModule(format="folder")
    with pytest.raises(ValueError, match="data.format must be one of"):
        EditDataModule(format="webdataset", metadata="x.csv")
    save_image(tmp_path / "a.png")
    with pytest.raises(MetadataError, match="data.control_dirs\\[0\\]=.*folder not found"):
        loaded(format="folder", image_dir=tmp_path, control_dirs=[tmp_path / "nope"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.format=folder"], "data.format=folder needs data.image_dir"),
        (["data.format=hf", "data.path=/d", "data.image_dir=/t"], "data.image_dir belongs to another format"),
        (["data.format=lmdb"], "data.format must be one of"),
        (["data.caption_dropout=2"], r"data.caption_dropout must be in \[0, 1\], got 2"),
    ],
)
def test_bad_data_source_settings_are_one_line_before_anything_is_built(overrides, message):
    from fusedit.errors import UserInputError
    from fusedit.training.validate_config import validate_train_config
    from tests.training_utils import compose_train

    with pytest.raises(UserInputError, match=message):
        validate_train_config(compose_train(overrides), check_paths=False)


# -- Hugging Face datasets -----------------------------------------------------------------------------------------
datasets = pytest.importorskip("datasets")


def imagefolder(root):
    """The rows of `pairs` as an imagefolder: file_name = target, edit_file_name = the edit image (an Image column)."""
    lines = []
    for index, size in enumerate(SIZES):
        save_image(root / f"s{index}.png", size, (index * 60, 10, 10))
        save_image(root / f"e{index}.jpg", size, (10, index * 60, 10))
        lines.append({"file_name": f"s{index}.png", "edit_file_name": f"e{index}.jpg", "text": f"make it red {index}"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


HF_COLUMNS = {"image": "image", "edit_image": "edit", "prompt": "text"}


@pytest.mark.parametrize("layout", ["imagefolder", "save_to_disk", "parquet"])
def test_hf_dataset_gives_the_csv_rows_and_buckets(tmp_path, layout):
    csv = loaded(metadata=pairs(tmp_path / "csv"))
    path = imagefolder(tmp_path / "imf")
    if layout != "imagefolder":  # the same rows as PIL images, whose bytes the dataset's own files embed
        columns = {"image": [f"s{i}.png" for i in range(3)], "edit": [f"e{i}.jpg" for i in range(3)]}
        dataset = datasets.Dataset.from_dict(
            {name: [Image.open(path / file).copy() for file in files] for name, files in columns.items()}
            | {"text": [f"make it red {i}" for i in range(3)]}
        )
        path = tmp_path / layout
        dataset.save_to_disk(str(path)) if layout == "save_to_disk" else dataset.to_parquet(str(path) + ".parquet")
        path = path if layout == "save_to_disk" else path.with_suffix(".parquet")
    hf = loaded(format="hf", path=path, columns=HF_COLUMNS, extract_dir=tmp_path / "extracted")
    ours, theirs = summary(hf), summary(csv)
    assert [(prompt) for _, _, prompt in ours[0]] == [prompt for _, _, prompt in theirs[0]]
    assert ours[1] == theirs[1]
    assert [s.row for s in hf.train_dataset.samples] == [0, 1, 2]  # row N = dataset[N]
    if layout != "imagefolder":
        assert all(s.image.parent == tmp_path / "extracted" for s in hf.train_dataset.samples)


def test_hf_dataset_errors_name_the_column_and_row(tmp_path):
    path = imagefolder(tmp_path)
    with pytest.raises(MetadataError, match=r"missing column\(s\) 'edit_image'.*'edit'.*data.columns"):
        loaded(format="hf", path=path, columns={"prompt": "text"})
    rows = {"image": ["s0.png", "../outside.png"], "edit_image": ["e0.jpg"] * 2, "prompt": ["a", "b"]}
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "paths.parquet"))
    with pytest.raises(DataValidationError) as error:
        loaded(format="hf", path=tmp_path / "paths.parquet")
    assert "1 of 2 rows are bad" in str(error.value)
    assert "row 1, column 'image': '../outside.png': path escapes data.base_path" in str(error.value)


def test_hf_mask_column_is_an_image_column_like_the_others(tmp_path):
    path = imagefolder(tmp_path)
    save_image(tmp_path / "m1.png", SIZES[1], (255, 255, 255))
    lines = [json.loads(line) for line in (path / "metadata.jsonl").read_text().splitlines()]
    for index, line in enumerate(lines):
        line["mask_file_name"] = "m1.png" if index == 1 else None
    (path / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    module = loaded(format="hf", path=path, columns=HF_COLUMNS)
    assert [s.mask for s in module.train_dataset.samples] == [None, tmp_path / "m1.png", None]
