"""Bad rows caught before step 1 and before the model loads (issue 10 section 4, issue 13's hangs and late crashes).

Each case used to pass validation and fail when its batch came up (or hang); the table is in docs/reliability.md.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time

import numpy as np
import pytest
from PIL import Image

from fusedit.data import DataValidationError, EditDataModule
from fusedit.data.images import DecodeBudget, decode_bytes, to_rgb
from fusedit.families import EDIT, EDIT_2509, EDIT_2511, TEXT_TO_IMAGE, folder_family
from tests.data_helpers import save_image, simple_dataset, write_csv


def _jsonl(path, rows: list[dict]):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _images(tmp_path, *names):
    for name in names:
        save_image(tmp_path / name)


def refused(module) -> str:
    with pytest.raises(DataValidationError) as info:
        module.setup()
    return str(info.value)


# -- edit image lists ---------------------------------------------------------------------------------------------


def test_empty_edit_image_list_is_refused_naming_the_row(tmp_path):
    _images(tmp_path, "t.png", "e.png")
    metadata = _jsonl(
        tmp_path / "m.jsonl",
        [
            {"image": "t.png", "edit_image": "e.png", "prompt": "ok"},
            {"image": "t.png", "edit_image": [], "prompt": "x"},
        ],
    )
    assert "row 2, column 'edit_image': no edit image" in refused(EditDataModule(metadata))


def test_empty_entry_in_a_pipe_list_is_refused(tmp_path):
    _images(tmp_path, "t.png", "e.png")
    metadata = write_csv(tmp_path / "m.csv", [["t.png", "e.png|", "x"], ["t.png", "|e.png", "y"]])
    message = refused(EditDataModule(metadata))
    assert "row 2, column 'edit_image', path 'e.png|': entry 2 of 2 is empty" in message
    assert "row 3, column 'edit_image', path '|e.png': entry 1 of 2 is empty" in message


def test_edit_image_count_is_judged_against_the_pipeline(
    tmp_path, tiny_edit_path, tiny_edit_plus_path, tiny_edit_2511_path
):
    _images(tmp_path, "t.png", "a.png", "b.png")
    metadata = write_csv(tmp_path / "m.csv", [["t.png", "a.png", "one"], ["t.png", "a.png|b.png", "two"]])
    message = refused(EditDataModule(metadata, model_path=tiny_edit_path))
    assert "row 3, column 'edit_image', path 'a.png|b.png': 2 edit images, but qwen-image-edit takes one" in message
    assert "row 2" not in message
    for pipeline in (tiny_edit_plus_path, tiny_edit_2511_path):
        module = EditDataModule(metadata, model_path=pipeline)
        module.setup()
        assert len(module.train_dataset) == 2


def test_on_error_skip_skips_every_new_row_kind(tmp_path, caplog, tiny_edit_path):
    _images(tmp_path, "t.png", "a.png", "b.png")
    metadata = _jsonl(
        tmp_path / "m.jsonl",
        [
            {"image": "t.png", "edit_image": "a.png", "prompt": "good"},
            {"image": "t.png", "edit_image": [], "prompt": "no edit image"},
            {"image": "t.png", "edit_image": "a.png|", "prompt": "empty entry"},
            {"image": "t.png", "edit_image": ["a.png", "b.png"], "prompt": "two under Edit"},
            {"image": "t.png", "edit_image": "a.png", "prompt": "long " * 1000},
        ],
    )
    module = EditDataModule(metadata, model_path=tiny_edit_path, on_error="skip")
    with caplog.at_level(logging.WARNING, logger="fusedit.data"):
        module.setup()
    assert [sample.row for sample in module.train_dataset.samples] == [1]
    assert "skipped 3 of 5 rows" in caplog.text and "skipped 1 of 2 rows" in caplog.text  # the long prompt last


def test_family_from_the_pipeline_json_alone(tiny_edit_path, tiny_edit_plus_path, tiny_edit_2511_path, tiny_t2i_path):
    assert folder_family(tiny_edit_path) == EDIT
    assert folder_family(tiny_edit_plus_path) == EDIT_2509
    assert folder_family(tiny_edit_2511_path) == EDIT_2511
    assert folder_family(tiny_t2i_path) == TEXT_TO_IMAGE


# -- prompts longer than the transformer's text positions ----------------------------------------------------------


def test_prompt_count_is_the_pipelines_own_embedding_length(tiny_edit_path, tiny_edit_plus_path):
    """The counter (tokenizer + processor, no weights) agrees with the real text encoder's output length."""
    from fusedit.data.images import to_tensor
    from fusedit.data.prompt_length import PromptCounter
    from fusedit.step.conditioning import EditConditioner

    prompt = "turn the sky purple and add three small boats " * 3
    for pipeline, sizes in ((tiny_edit_path, [(96, 64)]), (tiny_edit_plus_path, [(96, 64), (32, 64)])):
        counter = PromptCounter(pipeline)
        edits = [to_tensor(Image.new("RGB", size))[None] for size in sizes]
        embeds, _ = EditConditioner.from_pretrained(pipeline).encode_prompts([prompt], edits)
        assert counter.count(prompt, sizes) == embeds.shape[1]


def test_a_prompt_over_the_text_positions_is_refused_naming_row_and_count(tmp_path, tiny_edit_path):
    _images(tmp_path, "t.png", "e.png")
    metadata = write_csv(tmp_path / "m.csv", [["t.png", "e.png", "short"], ["t.png", "e.png", "x" * 5000]])
    message = refused(EditDataModule(metadata, model_path=tiny_edit_path))
    assert "row 3, column 'prompt': prompt is " in message and "text positions left beside this row's images" in message
    assert "data.long_prompt=truncate" in message and "row 2" not in message


def test_long_prompt_truncate_fits_it_with_a_warning(tmp_path, tiny_edit_path, caplog):
    from fusedit.data.prompt_length import PromptCounter, text_positions_left

    _images(tmp_path, "t.png", "e.png")
    metadata = write_csv(tmp_path / "m.csv", [["t.png", "e.png", "y" * 5000]])
    module = EditDataModule(metadata, model_path=tiny_edit_path, long_prompt="truncate")
    with caplog.at_level(logging.WARNING, logger="fusedit.data"):
        module.setup()
    (sample,) = module.train_dataset.samples
    target, edits = module.train_dataset.sizes[0]
    limit = text_positions_left([target, *edits])
    length = PromptCounter(tiny_edit_path).count(sample.prompt, list(edits))
    assert limit - 2 <= length <= limit and sample.prompt == "y" * len(sample.prompt)
    assert "row 2: prompt of" in caplog.text and "truncated to" in caplog.text


# -- splits and batches that leave nothing to train ---------------------------------------------------------------


def test_val_count_equal_to_the_dataset_is_a_data_refusal(tmp_path):
    module = EditDataModule(simple_dataset(tmp_path, n=3), val_count=3)
    assert "hold out 3 of 3 valid samples, which leaves no training data" in refused(module)


def test_batch_larger_than_the_dataset_with_drop_last_is_refused(tmp_path):
    metadata = simple_dataset(tmp_path, n=3)
    assert "leaves no full batch" in refused(EditDataModule(metadata, batch_size=4, drop_last=True))
    module = EditDataModule(metadata, batch_size=4, drop_last=False)
    module.setup()  # without drop_last the short batch trains
    assert len(module.train_sampler()) == 1


# -- files that are not regular files: refused, never opened ------------------------------------------------------


def _refused_within(module, seconds: float) -> str:
    result: dict = {}

    def run():
        try:
            module.setup()
        except DataValidationError as error:
            result["message"] = str(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "validation blocked on a file that is not a regular file"
    return result["message"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_and_dev_zero_rows_are_refused_without_opening(tmp_path):
    _images(tmp_path, "t.png")
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    metadata = write_csv(tmp_path / "m.csv", [["t.png", "pipe.png", "x"], ["zero.png", "t.png", "y"]])
    message = _refused_within(EditDataModule(metadata), 20)
    assert "row 2, column 'edit_image', path 'pipe.png': is a FIFO (named pipe), not a regular file" in message
    assert "row 3, column 'image', path 'zero.png': is a character device, not a regular file" in message


# -- decode memory bounded by bytes -------------------------------------------------------------------------------


def test_decode_bytes_counts_sixteen_bit_pixels():
    assert decode_bytes("L", 100, 100) == 100 * 100 * (1 + 4)
    assert decode_bytes("I;16", 7000, 7000) == 7000 * 7000 * (2 + 4)
    assert decode_bytes("RGBA", 10, 10) == 10 * 10 * (4 + 4)


def test_decode_budget_bounds_concurrent_bytes():
    budget = DecodeBudget(capacity=100)
    peak, lock = [0], threading.Lock()

    def work(nbytes):
        with budget.reserve(nbytes):
            with lock:
                peak[0] = max(peak[0], budget.in_use)
            time.sleep(0.02)

    threads = [threading.Thread(target=work, args=(n,)) for n in (60, 60, 60, 250)]  # 250: alone, no deadlock
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert not any(thread.is_alive() for thread in threads)
    assert peak[0] == 250 and budget.in_use == 0  # the oversized one ran alone; the others never exceeded 100


def test_sixteen_bit_conversion_is_exact_and_small(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.integers(0, 65536, (600, 37), dtype=np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as image:
        image.load()
        rgb = np.asarray(to_rgb(image))
    expected = np.clip(values.astype(np.float64) * (255.0 / 65535.0), 0, 255).round().astype(np.uint8)
    assert (rgb[..., 0] == expected).all() and (rgb[..., 2] == expected).all()
