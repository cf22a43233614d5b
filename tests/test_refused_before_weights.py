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
    check_prompt_lengths([Job("t2i", "z" * 5000)], tiny_edit_path, "qwen-image-edit")  # T2I cuts prompts itself
