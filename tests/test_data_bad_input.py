"""Bad input to the data module (issue 6): each case works correctly or fails before training, naming row and file.

The table of these cases and their outcomes is in docs/data.md.
"""

from __future__ import annotations

import logging
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from fusedit.data import DataValidationError, EditDataModule, MetadataError
from fusedit.data.images import load_image
from tests.data_helpers import noise_png, save_image, simple_dataset, write_csv


def module_for(tmp_path, bad_image=None, *, column="image", prompt="edit it", raw_path=None, **kwargs):
    """A one-row dataset whose `column` file is `bad_image` (a filename in tmp_path) or the literal `raw_path`."""
    save_image(tmp_path / "good.png")
    path = raw_path if raw_path is not None else bad_image
    row = [path, "good.png", prompt] if column == "image" else ["good.png", path, prompt]
    metadata = write_csv(tmp_path / "metadata.csv", [row])
    return EditDataModule(metadata, **kwargs)


def refused(module) -> str:
    with pytest.raises(DataValidationError) as info:
        module.setup()
    return str(info.value)


def first_batch(module) -> dict:
    module.setup()
    return next(iter(module.train_dataloader()))


# -- broken image files ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_truncated_image(tmp_path, fmt):
    noise_png(tmp_path / "full.png")
    if fmt == "jpg":
        Image.open(tmp_path / "full.png").save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / f"full.{fmt}").read_bytes()
    (tmp_path / f"cut.{fmt}").write_bytes(data[: len(data) // 2])
    message = refused(module_for(tmp_path, f"cut.{fmt}"))
    assert f"row 2, column 'image', path 'cut.{fmt}': corrupt or truncated image" in message


def test_zero_byte_image(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    assert "path 'empty.png': empty file (0 bytes)" in refused(module_for(tmp_path, "empty.png"))


def test_text_file_named_png(tmp_path):
    (tmp_path / "notes.png").write_text("this is not an image\n")
    message = refused(module_for(tmp_path, "notes.png", column="edit_image"))
    assert "row 2, column 'edit_image', path 'notes.png': not an image file PIL can read" in message


def test_missing_file_and_directory(tmp_path):
    (tmp_path / "folder.png").mkdir()
    save_image(tmp_path / "good.png")
    metadata = write_csv(tmp_path / "m.csv", [["nope.png", "good.png", "p"], ["folder.png", "good.png", "p"]])
    message = refused(EditDataModule(metadata))
    assert "row 2, column 'image', path 'nope.png': file not found" in message
    assert "row 3, column 'image', path 'folder.png': is a directory" in message


def _png_claiming_size(path, width, height):
    """A valid small PNG whose header claims width x height: the classic decompression bomb shape."""
    Image.new("1", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # IHDR CRC over type + data
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("claimed", "reason"),
    [
        ((8000, 8000), "8000x8000 = 64,000,000 pixels exceeds data.max_image_pixels=50,000,000"),
        ((12000, 12000), "exceeds data.max_image_pixels"),  # PIL only warns at this size; we refuse
        ((200000, 200000), "decompression bomb refused by PIL"),  # PIL raises itself
    ],
)
def test_decompression_bomb_refused_before_decoding(tmp_path, claimed, reason):
    _png_claiming_size(tmp_path / "bomb.png", *claimed)
    message = refused(module_for(tmp_path, "bomb.png"))
    assert "row 2, column 'image', path 'bomb.png'" in message and reason in message


def test_pixel_limit_is_configurable(tmp_path):
    save_image(tmp_path / "big.png", (200, 100))
    message = refused(module_for(tmp_path, "big.png", max_pixels=256, max_image_pixels=10_000))
    assert "200x100 = 20,000 pixels exceeds data.max_image_pixels=10,000" in message
    assert first_batch(module_for(tmp_path, "big.png", max_pixels=256, max_image_pixels=20_000))["row"] == [2]


# -- image modes and orientation ----------------------------------------------------------------------------------


def _rgb_of(tmp_path, name) -> tuple[int, int, int]:
    image = load_image(tmp_path / name)
    assert image.mode == "RGB"
    return image.getpixel((1, 1))


def test_cmyk_jpeg(tmp_path):
    save_image(tmp_path / "cmyk.jpg", (32, 32), (0, 255, 255, 0), mode="CMYK", quality=100)
    red, green, blue = _rgb_of(tmp_path, "cmyk.jpg")
    assert red > 230 and green < 30 and blue < 30
    assert first_batch(module_for(tmp_path, "cmyk.jpg"))["image"].shape == (1, 3, 32, 32)


def test_sixteen_bit_png_keeps_its_brightness(tmp_path):
    Image.fromarray(np.full((32, 32), 32896, dtype=np.uint16)).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    assert _rgb_of(tmp_path, "deep.png") == (128, 128, 128)  # not clipped to white


def test_rgba_and_la_composite_on_white(tmp_path):
    image = Image.new("RGBA", (32, 32), (255, 0, 0, 255))
    image.paste((0, 0, 255, 0), (0, 0, 16, 32))  # left half fully transparent
    image.save(tmp_path / "rgba.png")
    converted = load_image(tmp_path / "rgba.png")
    assert converted.getpixel((2, 2)) == (255, 255, 255) and converted.getpixel((30, 2)) == (255, 0, 0)
    save_image(tmp_path / "la.png", (32, 32), (0, 0), mode="LA")
    assert _rgb_of(tmp_path, "la.png") == (255, 255, 255)


def test_palette_grayscale_and_bilevel(tmp_path):
    Image.new("RGB", (32, 32), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE).save(
        tmp_path / "palette.png"
    )
    assert _rgb_of(tmp_path, "palette.png") == (10, 200, 30)
    transparent = Image.new("P", (32, 32), 0)
    transparent.putpalette([0, 0, 0] * 256)
    transparent.info["transparency"] = 0
    transparent.save(tmp_path / "palette_t.png", transparency=0)
    assert _rgb_of(tmp_path, "palette_t.png") == (255, 255, 255)
    save_image(tmp_path / "gray.png", (32, 32), 77, mode="L")
    assert _rgb_of(tmp_path, "gray.png") == (77, 77, 77)
    save_image(tmp_path / "bits.png", (32, 32), 1, mode="1")
    assert _rgb_of(tmp_path, "bits.png") == (255, 255, 255)


def test_exif_rotation_is_applied(tmp_path):
    # Stored 64 wide x 32 tall, left half red; EXIF orientation 6 = rotate 90 degrees clockwise to display.
    image = Image.new("RGB", (64, 32), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 32, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(tmp_path / "photo.jpg", exif=exif, quality=100)
    upright = load_image(tmp_path / "photo.jpg")
    assert upright.size == (32, 64)
    assert upright.getpixel((16, 8))[0] > 200 and upright.getpixel((16, 56))[2] > 200  # red ended up on top
    module = module_for(tmp_path, "photo.jpg")
    module.setup()
    assert module.train_dataset.samples[0].image_size == (32, 64)  # buckets see the displayed size
    assert first_batch(module)["image"].shape == (1, 3, 64, 32)


# -- metadata files -----------------------------------------------------------------------------------------------


def test_missing_column_names_it_and_lists_found(tmp_path):
    metadata = write_csv(tmp_path / "m.csv", [["a.png", "b.png", "p"]], header=("target", "edit_image", "prompt"))
    with pytest.raises(MetadataError, match=r"missing column\(s\) 'image'; columns found: 'target', 'edit_image'"):
        EditDataModule(metadata).setup()
    save_image(tmp_path / "a.png")
    save_image(tmp_path / "b.png")
    assert first_batch(EditDataModule(metadata, image_column="target"))["row"] == [2]


def test_duplicate_rows_are_kept_with_a_warning(tmp_path, caplog):
    save_image(tmp_path / "a.png")
    save_image(tmp_path / "b.png")
    metadata = write_csv(
        tmp_path / "m.csv", [["a.png", "b.png", "p"], ["a.png", "b.png", "q"], ["a.png", "b.png", "p"]]
    )
    module = EditDataModule(metadata)
    with caplog.at_level(logging.WARNING, logger="fusedit.data"):
        module.setup()
    assert len(module.train_dataset) == 3
    assert "identical rows" in caplog.text and "rows 2, 4" in caplog.text


def test_empty_csv_and_header_only(tmp_path):
    (tmp_path / "empty.csv").write_bytes(b"")
    with pytest.raises(MetadataError, match="empty.csv: the file is empty"):
        EditDataModule(tmp_path / "empty.csv").setup()
    write_csv(tmp_path / "header.csv", [])
    with pytest.raises(MetadataError, match="header.csv: has a header but no data rows"):
        EditDataModule(tmp_path / "header.csv").setup()
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(MetadataError, match="empty.jsonl: the file is empty"):
        EditDataModule(tmp_path / "empty.jsonl").setup()


def test_csv_that_is_not_utf8(tmp_path):
    metadata = write_csv(tmp_path / "latin.csv", [["a.png", "b.png", "make it café-coloured"]], encoding="latin-1")
    offset = metadata.read_bytes().index("é".encode("latin-1"))
    with pytest.raises(MetadataError, match=rf"latin.csv: not valid UTF-8 at byte offset {offset} \(line 2"):
        EditDataModule(metadata).setup()


def test_utf8_bom_is_accepted(tmp_path):
    simple_dataset(tmp_path, n=1)
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "metadata.csv").read_bytes())
    assert first_batch(EditDataModule(tmp_path / "bom.csv"))["row"] == [2]


def test_malformed_rows_and_jsonl(tmp_path):
    save_image(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text("image,edit_image,prompt\na.png,a.png\na.png,a.png,p,extra\n")
    message = refused(EditDataModule(tmp_path / "m.csv"))
    assert "row 2: has 2 fields, the header has 3" in message and "row 3: has 4 fields" in message
    (tmp_path / "m.jsonl").write_text('{"image": "a.png", "edit_image": "a.png", "prompt": "p"}\n{"image": \n')
    with pytest.raises(MetadataError, match=r"m.jsonl: line 2: not valid JSON"):
        EditDataModule(tmp_path / "m.jsonl").setup()
    (tmp_path / "n.jsonl").write_text('{"image": "a.png", "edit_image": "a.png", "prompt": "p"}\n{"image": "a.png"}\n')
    message = refused(EditDataModule(tmp_path / "n.jsonl"))
    assert "row 2, column 'prompt': field missing on this line" in message


def test_unknown_metadata_format(tmp_path):
    (tmp_path / "m.parquet").write_bytes(b"PAR1")
    with pytest.raises(MetadataError, match=r"unsupported metadata format '.parquet'"):
        EditDataModule(tmp_path / "m.parquet").setup()
    with pytest.raises(MetadataError, match="metadata file not found"):
        EditDataModule(tmp_path / "absent.csv").setup()


# -- prompts ------------------------------------------------------------------------------------------------------


def test_unicode_prompt_passes_through(tmp_path):
    prompt = "把正方形变成红色 — «rouge» 🎨"
    save_image(tmp_path / "a.png")
    assert first_batch(module_for(tmp_path, "a.png", prompt=prompt))["prompt"] == [prompt]


@pytest.mark.parametrize("prompt", ["", "   \t"])
def test_empty_prompt(tmp_path, prompt):
    save_image(tmp_path / "a.png")
    assert "row 2, column 'prompt': empty prompt" in refused(module_for(tmp_path, "a.png", prompt=prompt))


# -- paths --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", ["../../etc/passwd", "images/../../outside.png", ".."])
def test_path_escaping_base_path(tmp_path, raw):
    save_image(tmp_path / "outside.png")
    base = tmp_path / "data"
    base.mkdir()
    save_image(base / "good.png")
    metadata = write_csv(base / "m.csv", [[raw, "good.png", "p"]])
    message = refused(EditDataModule(metadata))
    assert f"row 2, column 'image', path '{raw}': path escapes data.base_path" in message


def test_absolute_path_refused_unless_allowed(tmp_path):
    save_image(tmp_path / "a.png")
    message = refused(module_for(tmp_path, raw_path="/etc/passwd"))
    assert "path '/etc/passwd': absolute path refused (set data.allow_absolute_paths=true" in message
    absolute = str(tmp_path / "a.png")
    assert first_batch(module_for(tmp_path, raw_path=absolute, allow_absolute_paths=True))["row"] == [2]


def test_base_path_option(tmp_path):
    images = tmp_path / "images"
    save_image(images / "a.png")
    save_image(images / "b.png")
    (tmp_path / "meta").mkdir()
    metadata = write_csv(tmp_path / "meta" / "m.csv", [["a.png", "b.png", "p"]])
    assert first_batch(EditDataModule(metadata, base_path=images))["row"] == [2]
    assert "file not found" in refused(EditDataModule(metadata))


# -- geometry -----------------------------------------------------------------------------------------------------


def test_wildly_different_target_and_edit_aspect(tmp_path):
    save_image(tmp_path / "wide.png", (640, 40))
    save_image(tmp_path / "tall.png", (40, 640))
    save_image(tmp_path / "sliver.png", (4000, 1))
    metadata = write_csv(tmp_path / "m.csv", [["wide.png", "tall.png", "p"], ["sliver.png", "tall.png", "q"]])
    module = EditDataModule(metadata, max_pixels=128 * 128, batch_size=2)
    module.setup()
    batches = list(module.train_dataloader())
    assert len(batches) == 2  # different target shapes -> different buckets
    by_row = {batch["row"][0]: batch for batch in batches}
    assert by_row[2]["image"].shape == (1, 3, 32, 512)  # aspect 16:1 kept up to multiples of 16
    edit = by_row[2]["edit_images"][0]
    assert edit.shape[2] > edit.shape[3] and edit.shape[2] % 32 == 0 and edit.shape[2] * edit.shape[3] <= 2 * 16384
    target = by_row[3]["image"]
    assert target.shape[2] == 16 and target.shape[3] % 16 == 0 and target.shape[2] * target.shape[3] <= 128 * 128
    assert torch.isfinite(target).all()


# -- reporting ------------------------------------------------------------------------------------------------------


def _mixed_dataset(tmp_path):
    save_image(tmp_path / "a.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n")
    rows = [
        ["a.png", "a.png", "fine"],
        ["bad.png", "a.png", "broken target"],
        ["a.png", "a.png|missing.png", "second edit image missing"],
        ["a.png", "a.png", ""],
        ["a.png", "a.png", "also fine"],
    ]
    return write_csv(tmp_path / "m.csv", rows)


def test_every_bad_row_is_listed_in_one_error(tmp_path):
    with pytest.raises(DataValidationError) as info:
        EditDataModule(_mixed_dataset(tmp_path)).setup()
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'm.csv'}: 3 of 5 rows are bad:")
    for expected in (
        "row 3, column 'image', path 'bad.png'",
        "row 4, column 'edit_image', path 'missing.png'",
        "row 5, column 'prompt': empty prompt",
        "data.on_error=skip",
    ):
        assert expected in message
    assert [problem.row for problem in info.value.problems] == [3, 4, 5]


def test_on_error_skip_drops_bad_rows_and_logs_the_count(tmp_path, caplog):
    module = EditDataModule(_mixed_dataset(tmp_path), on_error="skip")
    with caplog.at_level(logging.WARNING, logger="fusedit.data"):
        module.setup()
    assert [sample.row for sample in module.train_dataset.samples] == [2, 6]
    assert "skipped 3 of 5 rows" in caplog.text


def test_on_error_skip_with_nothing_left_still_fails(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"junk")
    metadata = write_csv(tmp_path / "m.csv", [["bad.png", "bad.png", "p"]])
    with pytest.raises(DataValidationError, match="no valid row is left"):
        EditDataModule(metadata, on_error="skip").setup()


def test_file_broken_after_validation_names_row_and_path(tmp_path):
    metadata = simple_dataset(tmp_path, n=2)
    module = EditDataModule(metadata, shuffle=False)
    module.setup()
    (tmp_path / "target_0.png").write_bytes(b"")
    with pytest.raises(RuntimeError, match=r"row 2: .*target_0.png: cannot load image"):
        list(module.train_dataloader())
