"""What `fusedit` commands print: the command line's own words in errors, no traceback for a closed pipe."""

from __future__ import annotations

import subprocess
import sys

import pytest
from safetensors.torch import save_file

from fusedit.cli import main
from tests.convert_utils import tiny_state_dict
from tests.training_utils import script_env


def test_an_existing_output_is_refused_in_the_command_line_words(tmp_path, capsys):
    save_file(tiny_state_dict(), tmp_path / "in.safetensors")
    (tmp_path / "out.safetensors").write_bytes(b"precious")
    assert (
        main(
            [
                "convert",
                "--input",
                str(tmp_path / "in.safetensors"),
                "--output",
                str(tmp_path / "out.safetensors"),
                "--direction",
                "to_merged",
            ]
        )
        == 2
    )
    error = capsys.readouterr().err
    assert "--overwrite" in error and "overwrite=True" not in error and len(error.splitlines()) == 1
    assert (tmp_path / "out.safetensors").read_bytes() == b"precious"
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "keep.txt").write_text("x")
    assert main(["make-tiny", str(tmp_path / "tiny"), "--variant", "t2i"]) == 2
    error = capsys.readouterr().err
    assert "--overwrite" in error and "overwrite=True" not in error


def test_a_reader_that_closes_the_pipe_early_gets_no_traceback(tiny_edit_path):
    # `fusedit detect ... | head -1`: the reader is gone before fusedit writes (closed here before it started).
    process = subprocess.Popen(
        [sys.executable, "-m", "fusedit.cli", "detect", str(tiny_edit_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=script_env(),
    )
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 141, stderr
    assert stderr == ""


@pytest.mark.parametrize("command", ["cache", "plan"])  # both compose train.py's config (fusedit.train_config)
def test_a_misspelt_key_in_a_command_composing_the_train_config_is_one_line(command, tmp_path, capsys):
    assert main([command, "lora.rnak=8", f"paths.root_dir={tmp_path}"]) == 2
    error = capsys.readouterr().err
    assert error == f"fusedit {command}: error: unknown setting 'lora.rnak'; did you mean lora.rank?\n"
    assert main([command, "model=mergd"]) == 2
    error = capsys.readouterr().err
    assert "Available options in 'model': merged_qkv standard" in error and len(error.splitlines()) == 1


def test_adding_a_setting_fusedit_does_not_read_is_refused_with_the_one_meant(tmp_path, capsys):
    # Hydra's hint for a misspelt key is "+key=value", which would add a key nothing reads (fusedit.train_config).
    assert main(["plan", "+optim.lrr=1e-4", f"paths.root_dir={tmp_path}"]) == 2
    error = capsys.readouterr().err
    assert "'+optim.lrr=1e-4' adds a setting fusedit does not read" in error and "did you mean optim.lr?" in error
    assert len(error.splitlines()) == 1
    # One level off: the name is found by its last part.
    assert main(["plan", "optim=prodigy", "optim.d_coeff=2", f"paths.root_dir={tmp_path}"]) == 2
    assert "did you mean optim.optimizer.d_coef?" in capsys.readouterr().err
