"""`fusedit download` without network: a clear error, at once, and nothing downloaded."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fusedit.download import allow_patterns, component_names

SRC = Path(__file__).resolve().parents[1] / "src"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again when the block ends: connections are refused


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "closed endpoint"])
def test_offline_download_fails_fast_and_clearly(offline, tmp_path):
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),
        "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    env.pop("HF_HUB_OFFLINE", None)
    if offline == "HF_HUB_OFFLINE":
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{closed_port()}"
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "fusedit.download", "Qwen/Qwen-Image-Edit", "--to", str(tmp_path / "model")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert "cannot download Qwen/Qwen-Image-Edit" in result.stderr
    assert ("HF_HUB_OFFLINE is set" if offline == "HF_HUB_OFFLINE" else "cannot be reached") in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 20  # huggingface_hub alone retries for ~25 s
    assert not (tmp_path / "model").exists()


def test_only_pipeline_components_are_allowed():
    index = {
        "_class_name": "QwenImageEditPipeline",
        "_diffusers_version": "0.35.0",
        "processor": ["transformers", "Qwen2VLProcessor"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "QwenImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLQwenImage"],
        "safety_checker": [None, None],
    }
    names = component_names(index)
    assert names == ["processor", "scheduler", "text_encoder", "tokenizer", "transformer", "vae"]
    patterns = allow_patterns(["transformer"])
    assert "model_index.json" in patterns and "transformer/*.safetensors" in patterns
    assert not any(p.endswith((".bin", ".pt", ".ckpt")) or p.startswith("vae/") for p in patterns)
