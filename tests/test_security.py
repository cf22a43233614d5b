"""No pickle from user paths, no remote code: checked over the whole source tree, so a new call site fails CI."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [*ROOT.joinpath("src").rglob("*.py"), ROOT / "train.py", ROOT / "infer.py"]


def python_sources():
    return [path for path in SOURCES if path.is_file()]


def test_no_pickle_loading_anywhere():
    forbidden = re.compile(
        r"\bimport pickle\b|\bpickle\.loads?\(|\bcloudpickle\b|\bdill\b|\bnp\.load\([^)]*allow_pickle=True"
    )
    offenders = [
        f"{p}:{i}"
        for p in python_sources()
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if forbidden.search(line)
    ]
    assert offenders == []


def test_every_torch_load_is_weights_only():
    offenders = []
    for path in python_sources():
        text = path.read_text()
        for match in re.finditer(r"torch\.load\(", text):
            call = text[match.start() : text.find(")", match.start()) + 1]
            if "weights_only=True" not in call:
                offenders.append(f"{path}:{text[: match.start()].count(chr(10)) + 1}")
    assert offenders == []


def test_no_remote_code():
    offenders = [str(p) for p in python_sources() if re.search(r"trust_remote_code\s*=\s*True", p.read_text())]
    assert offenders == []


def test_sources_are_scanned():
    # The checks above must be looking at the real package, not an empty list.
    assert any(path.name == "merged_qkv.py" for path in python_sources())


def test_a_shard_index_cannot_point_outside_the_model_folder(tmp_path):
    """A `*.safetensors.index.json` is someone else's file: its shard names must stay inside the folder, for
    loading, conversion and detect alike (one reader), and the refusal is one line naming the index."""
    import json
    import subprocess
    import sys

    import pytest
    import torch
    from safetensors.torch import save_file

    from fusedit.convert import convert_checkpoint
    from fusedit.detect import detect
    from fusedit.model.loading import load_transformer

    outside = tmp_path / "outside"
    outside.mkdir()
    save_file({"img_in.weight": torch.zeros(2, 2)}, outside / "x.safetensors")
    model = tmp_path / "models" / "transformer"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    index = model / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"img_in.weight": "../../outside/x.safetensors"}}))
    for read in (detect, load_transformer, lambda path: convert_checkpoint(path, tmp_path / "out", "to_merged")):
        with pytest.raises(ValueError, match=r"index\.json: shard '\.\./\.\./outside/x\.safetensors' is outside"):
            read(model)
    result = subprocess.run(
        [sys.executable, "-m", "fusedit.cli", "detect", str(model)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "is outside" in result.stderr, result.stderr


def _raw_safetensors(path: Path, header, data: bytes = b"") -> Path:
    import json
    import struct

    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


# (name, header, data, what the one-line refusal says). Each file is hostile in one way only.
_F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
HOSTILE_SAFETENSORS = [
    ("overlap", {"a.weight": _F32_2, "b.weight": {**_F32_2, "data_offsets": [4, 12]}}, bytes(12), "overlap"),
    ("out_of_range", {"a.weight": {**_F32_2, "data_offsets": [8, 16]}}, bytes(8), "truncated"),
    ("wrong_dtype", {"a.weight": {**_F32_2, "dtype": "F33"}}, bytes(8), "unknown dtype"),
    ("size_mismatch", {"a.weight": {**_F32_2, "shape": [3]}}, bytes(8), "needs 12 bytes"),
    ("truncated", {"a.weight": {**_F32_2, "shape": [4], "data_offsets": [0, 16]}}, bytes(8), "truncated"),
    ("list_header", [1, 2, 3], b"", "JSON list"),
    ("metadata_not_json", {"__metadata__": "oops", "a.weight": _F32_2}, bytes(8), "__metadata__"),
    ("negative_offset", {"a.weight": {**_F32_2, "data_offsets": [-8, 0]}}, bytes(8), "data_offsets"),
]


def test_hostile_safetensors_are_refused_by_every_reader_naming_the_file(tmp_path):
    """One validation in fusedit.io.read_safetensors_header serves detect, convert and the loaders: each malformed
    header is a ValueError naming the file, and the CLI prints it as one line with exit status 2."""
    import subprocess
    import sys

    import pytest

    from fusedit.convert import convert_checkpoint
    from fusedit.detect import detect
    from fusedit.io import SafetensorsHeaderError, read_safetensors_header

    for name, header, data, says in HOSTILE_SAFETENSORS:
        path = _raw_safetensors(tmp_path / f"{name}.safetensors", header, data)
        for read in (read_safetensors_header, detect, lambda p: convert_checkpoint(p, tmp_path / "o.safetensors")):
            with pytest.raises(SafetensorsHeaderError, match=re.escape(str(path)) + ".*" + says):
                read(path)
    path = tmp_path / "overlap.safetensors"  # convert's CLI prints the same ValueError the same way
    result = subprocess.run(
        [sys.executable, "-m", "fusedit.cli", "detect", str(path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and str(path) in result.stderr and "overlap" in result.stderr


def test_a_well_formed_file_passes_the_header_validation(tmp_path):
    import torch
    from safetensors.torch import save_file

    from fusedit.io import read_safetensors_header

    path = tmp_path / "ok.safetensors"
    save_file({"a": torch.zeros(2, 3), "b": torch.zeros(0), "c": torch.ones(1, dtype=torch.bfloat16)}, path, {"k": "v"})
    header, metadata = read_safetensors_header(path)
    assert metadata == {"k": "v"} and header["a"]["shape"] == [2, 3] and header["b"]["shape"] == [0]
