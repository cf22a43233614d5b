"""What `fusedit` commands print: the command line's own words in errors, no traceback for a closed pipe."""

from __future__ import annotations

from safetensors.torch import save_file

from fusedit.cli import main
from tests.convert_utils import tiny_state_dict


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
