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
