"""profile=auto (the default): the inference profile for the detected GPU memory; a CPU machine runs on the CPU."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from hydra import compose, initialize_config_dir

from fusedit.inference.profiles import auto_profile_name, resolve_auto_profile
from fusedit.inference.run import infer
from tests.training_utils import CONF


def compose_infer(*overrides: str):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose("infer", overrides=list(overrides))


def test_auto_profile_by_detected_memory(monkeypatch):
    assert [auto_profile_name(gb) for gb in (None, 85.1, 25.8, 24.0, 17.2, 12.9, 8.6)] == [
        "cpu", "high_vram", "24gb", "24gb", "12gb", "12gb", "8gb",
    ]  # fmt: skip
    cfg = compose_infer("model.path=/m", "profile.dtype=float16")
    assert cfg.profile.name == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(total_memory=25.8e9))
    chosen = resolve_auto_profile(cfg.profile)
    assert chosen.name == "24gb" and chosen.offload == "model" and chosen.dtype == "float16"  # the override kept


def test_default_profile_runs_on_a_cpu_machine(tiny_t2i_path, tmp_path):
    if torch.cuda.is_available():
        return  # the CPU case only
    cfg = compose_infer(
        f"model.path={tiny_t2i_path}", "prompt=a red cube", "sampling.steps=2", "sampling.height=64",
        "sampling.width=64", f"output={tmp_path / 'out.png'}",
    )  # fmt: skip
    record = infer(cfg)
    assert record["profile"]["device"] == "cpu" and (tmp_path / "out.png").is_file()
