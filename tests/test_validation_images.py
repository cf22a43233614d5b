"""Validation images: a labelled sheet on disk, and wandb panels whose PNGs are inside the (offline) run directory;
a user's own validation samples, checked before the model loads."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from fusedit.training.callbacks import PROMPT_HEIGHT, ValidationImages, ValidationRow
from fusedit.training.validate_config import ConfigError, validate_train_config
from tests.training_utils import compose_train


def rows(with_target: bool = True) -> list[ValidationRow]:
    def image(colour):
        return Image.new("RGB", (32, 24), colour)

    return [
        ValidationRow([image("red")], image("green"), image("blue") if with_target else None, "make it green"),
        ValidationRow([image("red"), image("gray")], image("white"), None, "the second one"),
    ]


def media_references(run_dir: Path) -> set[str]:
    """Every `media/...` file the run's record stream and its table/panel JSON files refer to."""
    found = set()
    for path in [*run_dir.glob("*.wandb"), *run_dir.rglob("*.json")]:
        text = path.read_bytes().decode("latin-1")
        found |= set(re.findall(r"media/[A-Za-z0-9_./-]+\.(?:png|jpg|jpeg|json)", text))
    return found


def test_wandb_offline_run_holds_every_image_it_refers_to(tmp_path, monkeypatch):
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb.finish()  # a run left open by an earlier test would be reused by the logger (and written elsewhere)
    logger = WandbLogger(save_dir=str(tmp_path), project="fusedit-test")
    run = logger.experiment
    callback = ValidationImages(tmp_path / "samples", num_samples=2)
    sheet_path = callback.write(rows(), step=3, loggers=[logger])
    run.finish()
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    references = media_references(run_dir)
    pngs = {r for r in references if r.endswith(".png")}
    assert len(pngs) >= 2 + 2 + 1 + 1  # 2 sheets, 2 outputs, the inputs (both red: one file), the one target
    for reference in references:
        path = run_dir / "files" / reference
        assert path.is_file(), f"{reference} is referred to but not in the run dir"
        if reference.endswith(".png"):
            Image.open(path).verify()
    # `wandb sync` uploads the run's files/ folder and replays the .wandb stream: nothing lives outside run_dir.
    assert not any("staging" in r for r in references)
    assert sheet_path.is_file() and Image.open(sheet_path).width >= 32 * 3


def test_the_sheet_labels_its_columns_and_shows_the_prompt(tmp_path):
    path = ValidationImages(tmp_path, num_samples=2).write(rows(), step=1)
    sheet = Image.open(path).convert("RGB")
    label_height = 14  # inference's comparison sheet label band
    assert sheet.height == 2 * (24 + label_height + PROMPT_HEIGHT)
    assert sheet.width == 32 * 3  # 2 inputs + output (no target) is also 3 panels wide
    band = sheet.crop((0, 0, 32, label_height)).getcolors(maxcolors=4096)
    assert len(band) > 1  # a label drawn in the band above the first panel
    prompt_band = sheet.crop((0, label_height + 24, 96, label_height + 24 + PROMPT_HEIGHT)).getcolors(maxcolors=4096)
    assert len(prompt_band) > 1


def test_user_samples_are_checked_before_the_model_loads(tmp_path):
    Image.new("RGB", (16, 16), "red").save(tmp_path / "cat.png")
    (tmp_path / "notes.txt").write_text("not an image")
    key = "callbacks.validation_images"
    good = compose_train([f"{key}.base_path={tmp_path}", f"+{key}.x=1"][:1] + [
        f"{key}.samples=[{{edit_image: cat.png, prompt: make it a ghost}}]"])  # fmt: skip
    validate_train_config(good, check_paths=False)
    bad = compose_train([
        f"{key}.base_path={tmp_path}",
        f"{key}.samples=[{{edit_image: missing.png, prompt: x}}, {{edit_image: notes.txt, prompt: ''}}, {{prompt: y}}]",
    ])  # fmt: skip
    with pytest.raises(ConfigError) as error:
        validate_train_config(bad)
    message = str(error.value)
    assert f"{key}.samples[0].edit_image {tmp_path / 'missing.png'}: file not found" in message
    assert f"{key}.samples[1].prompt must be a non-empty text" in message
    assert f"{key}.samples[1].edit_image {tmp_path / 'notes.txt'}: not an image file" in message
    assert f"{key}.samples[2].edit_image must be an image path" in message


def test_user_samples_are_what_gets_generated(tmp_path):
    Image.new("RGB", (16, 16), "red").save(tmp_path / "cat.png")
    Image.new("RGB", (16, 16), "blue").save(tmp_path / "ghost.png")
    callback = ValidationImages(
        tmp_path / "samples",
        num_samples=5,
        samples=[{"edit_image": "cat.png", "prompt": "a ghost", "image": "ghost.png"}, {"edit_image": ["cat.png"],
                                                                                      "prompt": "b"}],
        base_path=tmp_path,
    )  # fmt: skip
    assert callback.num_samples == 2
    (inputs, target, prompt), (inputs2, target2, prompt2) = callback.user_rows()
    assert prompt == "a ghost" and target.getpixel((0, 0)) == (0, 0, 255) and inputs[0].getpixel((0, 0)) == (255, 0, 0)
    assert target2 is None and prompt2 == "b" and len(inputs2) == 1
    json.dumps(callback.user_samples)  # plain data (OmegaConf nodes converted), safe to pickle into checkpoints
