"""train.py refuses bad data, a missing ckpt_path and a broken run file before any weight is read (issues 13, 14).

The table of these cases is in docs/reliability.md.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from fusedit.data import DataValidationError
from fusedit.errors import UserInputError
from tests.data_helpers import save_image, write_csv
from tests.training_utils import REPO, script_env, train_cfg


def _two_image_rows(tmp_path):
    for name in ("t.png", "a.png", "b.png"):
        save_image(tmp_path / name)
    return write_csv(tmp_path / "m.csv", [["t.png", "a.png", "one"], ["t.png", "a.png|b.png", "two"]])


def test_bad_rows_are_refused_before_the_model_is_built(tmp_path, tiny_edit_path, monkeypatch):
    import fusedit.training.train as train_module

    def no_weights(*args, **kwargs):
        raise AssertionError("the model was built before the data was validated")

    monkeypatch.setattr(train_module, "build_module", no_weights)
    cfg = train_cfg(tmp_path, tiny_edit_path, _two_image_rows(tmp_path))
    with pytest.raises(DataValidationError, match=r"row 3, column 'edit_image'.*qwen-image-edit takes one"):
        train_module.train(cfg)


def test_bad_rows_under_the_cache_are_refused_too(tmp_path, tiny_edit_path):
    from fusedit.cache.training import cached_datamodule

    cfg = train_cfg(tmp_path, tiny_edit_path, _two_image_rows(tmp_path), ["cache.enabled=true"])
    with pytest.raises(DataValidationError, match=r"row 3, column 'edit_image'.*qwen-image-edit takes one"):
        cached_datamodule(cfg).setup("fit")


def test_an_invalid_resumes_yaml_is_named(tmp_path):
    from fusedit.training.train import RESUMES_FILE, run_overrides

    (tmp_path / RESUMES_FILE).write_text("- time: [unclosed\n")
    with pytest.raises(UserInputError, match=rf"{tmp_path / RESUMES_FILE}: not a valid YAML file"):
        run_overrides(tmp_path)


def _train_py(*overrides: str, cwd) -> subprocess.CompletedProcess:
    command = [sys.executable, "-X", "importtime", str(REPO / "train.py"), *overrides]
    return subprocess.run(command, capture_output=True, text=True, env=script_env(), cwd=cwd, timeout=300)


def test_train_py_missing_ckpt_path_is_one_line_before_lightning(tmp_path):
    result = _train_py(f"ckpt_path={tmp_path / 'no-such-run'}", cwd=tmp_path)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
    assert errors == [
        f"fusedit: error: invalid training config: ckpt_path={tmp_path / 'no-such-run'} does not exist; give a run "
        "directory (outputs/train/runs/<time>) or a .ckpt file"
    ]
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "lightning" not in imported and "torch" not in imported


# -- inference: only regular files are opened, and rows are judged against the family ------------------------------


def _within(seconds, function, *args):
    import threading

    outcome: dict = {}

    def run():
        try:
            outcome["value"] = function(*args)
        except Exception as error:  # noqa: BLE001 - handed back to the test
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{function.__name__} blocked on a file that is not a regular file"
    return outcome


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="needs FIFOs")
def test_infer_inputs_that_are_fifos_or_devices_are_refused_without_blocking(tmp_path):
    import os

    from fusedit.inference.inputs import collect_jobs

    os.mkfifo(tmp_path / "pipe.png")
    os.mkfifo(tmp_path / "rows.csv")
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    save_image(tmp_path / "a.png")
    table = write_csv(tmp_path / "t.csv", [["", "pipe.png", "x"], ["", "a.png|", "y"]])
    cases = {
        str(tmp_path / "pipe.png"): f"input={tmp_path / 'pipe.png'} is a FIFO (named pipe), not a regular file",
        str(tmp_path / "rows.csv"): f"input={tmp_path / 'rows.csv'} is a FIFO (named pipe)",
        str(tmp_path / "zero.png"): "is a character device, not a regular file",
        str(table): "row 2 column 'edit_image': image",
    }
    for source, expected in cases.items():
        outcome = _within(20, collect_jobs, source, "prompt")
        assert isinstance(outcome.get("error"), UserInputError) and expected in str(outcome["error"]), outcome
    message = str(_within(20, collect_jobs, str(table), "p")["error"])
    assert "is a FIFO (named pipe), not a regular file" in message
    assert "row 3 column 'edit_image': 'a.png|' has an empty entry" in message
    outcome = _within(20, collect_jobs, [str(tmp_path / "a.png"), str(tmp_path / "pipe.png")], "p")
    assert "input image" in str(outcome["error"]) and "is a FIFO" in str(outcome["error"])


def test_infer_jobs_are_judged_against_the_family(tmp_path):
    from fusedit.inference.inputs import Job
    from fusedit.inference.preflight import check_jobs_fit

    two = [Job("j", "p", (tmp_path / "a.png", tmp_path / "b.png"), source="rows.csv row 2")]
    with pytest.raises(UserInputError, match="rows.csv row 2: 2 edit images, but qwen-image-edit takes one"):
        check_jobs_fit(two, "qwen-image-edit")
    check_jobs_fit(two, "qwen-image-edit-2509")
    check_jobs_fit([Job("t", "p")], "qwen-image-edit")  # no input image with an edit model: text-to-image


def test_infer_preflight_refuses_a_prompt_over_the_text_positions(tmp_path, tiny_edit_path):
    from fusedit.inference.inputs import Job
    from fusedit.inference.preflight import check_prompt_lengths

    save_image(tmp_path / "a.png", size=(96, 64))
    long_job = Job("long", "z" * 5000, (tmp_path / "a.png",), source="input a.png")
    with pytest.raises(UserInputError, match=r"input a.png: the prompt is \d+ text tokens .* text positions left"):
        check_prompt_lengths([long_job], tiny_edit_path, "qwen-image-edit")
    check_prompt_lengths([Job("ok", "make it blue", (tmp_path / "a.png",))], tiny_edit_path, "qwen-image-edit")


def test_text_to_image_prompt_count_is_what_the_pipeline_encodes_before_it_cuts(tiny_t2i_path):
    """diffusers' QwenImagePipeline silently keeps the first max_sequence_length prompt positions: the counter
    agrees with its embedding below the cut and sees the length above it."""
    from diffusers import QwenImagePipeline
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from fusedit.data.prompt_length import TextToImagePromptCounter

    text_encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_t2i_path / "text_encoder")
    tokenizer = AutoTokenizer.from_pretrained(tiny_t2i_path / "tokenizer")
    pipe = QwenImagePipeline(
        scheduler=None, vae=None, text_encoder=text_encoder, tokenizer=tokenizer, transformer=None
    )  # fmt: skip
    counter = TextToImagePromptCounter(tiny_t2i_path)
    short, long = "a red fox in the snow, " * 3, "a red fox in the snow, " * 100
    embeds, _ = pipe.encode_prompt(short, device="cpu", max_sequence_length=1024)
    assert counter.count(short) == embeds.shape[1]
    embeds, _ = pipe.encode_prompt(long, device="cpu", max_sequence_length=512)
    assert embeds.shape[1] == 512 < counter.count(long)  # cut silently by diffusers; seen by the counter


def test_infer_refuses_or_truncates_a_text_to_image_prompt_the_pipeline_would_cut(tmp_path, tiny_t2i_path, caplog):
    """Before any weight loads: refused with one line naming the job, or (long_prompt=truncate) shortened to fit
    max_sequence_length with a warning; on a T2I model and for the text-only jobs of an edit model alike."""
    from hydra import compose, initialize_config_dir

    from fusedit.data.prompt_length import TextToImagePromptCounter
    from fusedit.inference.preflight import preflight
    from tests.training_utils import CONF

    prompt = "a red fox in the snow " * 100
    overrides = [f"model.path={tiny_t2i_path}", f"prompt='{prompt}'", f"output={tmp_path / 'out'}", "profile=cpu"]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        refused = compose("infer", overrides=overrides)
        truncated = compose("infer", overrides=[*overrides, "long_prompt=truncate", "sampling.max_sequence_length=64"])
    with pytest.raises(UserInputError) as info:
        preflight(refused)
    message = str(info.value)
    assert message.startswith("prompt: the prompt is ") and len(message.splitlines()) == 1
    assert "encodes only the first 512 (sampling.max_sequence_length" in message and "long_prompt=truncate" in message
    with caplog.at_level("WARNING", logger="fusedit.inference"):
        (job,) = preflight(truncated).jobs
    assert 60 <= TextToImagePromptCounter(tiny_t2i_path).count(job.prompt) <= 64 and prompt.startswith(job.prompt)
    assert "prompt: prompt of" in caplog.text and "(long_prompt=truncate)" in caplog.text


def test_infer_long_prompt_on_an_edit_model(tmp_path, tiny_edit_path, caplog):
    from fusedit.data.prompt_length import PromptCounter
    from fusedit.inference.inputs import Job
    from fusedit.inference.preflight import check_prompt_lengths

    save_image(tmp_path / "a.png", size=(96, 64))
    text_only = Job("t2i", "z" * 5000, source="csv row 3")
    with pytest.raises(
        UserInputError, match=r"^csv row 3: the prompt is \d+ text tokens .* encodes only the first 512"
    ):
        check_prompt_lengths([text_only], tiny_edit_path, "qwen-image-edit")
    edit = Job("long", "z" * 5000, (tmp_path / "a.png",), source="input a.png")
    with caplog.at_level("WARNING", logger="fusedit.inference"):
        (fitted,) = check_prompt_lengths([edit], tiny_edit_path, "qwen-image-edit", long_prompt="truncate")
    assert "input a.png: prompt of" in caplog.text and fitted.prompt == "z" * len(fitted.prompt)
    assert 4000 < PromptCounter(tiny_edit_path).count(fitted.prompt, [(96, 64)]) <= 4096
    with pytest.raises(UserInputError, match="sampling.max_sequence_length=2048: diffusers' Qwen-Image pipelines"):
        check_prompt_lengths([text_only], tiny_edit_path, "qwen-image-edit", max_sequence_length=2048)
