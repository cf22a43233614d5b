"""optim=adamw8bit: bitsandbytes' 8-bit AdamW over the LoRA parameters, its checkpoints and its refusal."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fusedit.data import make_sample_dataset
from fusedit.optim import STATE_BYTES_PER_PARAMETER
from fusedit.training.train import train
from fusedit.training.validate_config import ConfigError, validate_train_config
from tests.training_utils import compose_train, train_cfg


@pytest.fixture(scope="module")
def sample_metadata(tmp_path_factory) -> Path:
    return make_sample_dataset(tmp_path_factory.mktemp("data"), n=2, size=32)


def test_adamw8bit_trains_keeps_8bit_moments_and_resumes(tmp_path, tiny_edit_path, sample_metadata):
    pytest.importorskip("bitsandbytes", reason="optim=adamw8bit needs bitsandbytes (the lowmem / dev extra)")
    overrides = [
        "optim=adamw8bit",
        "optim.optimizer.min_8bit_size=0",
        "callbacks.model_checkpoint.every_n_train_steps=1",
    ]
    result = train(train_cfg(tmp_path, tiny_edit_path, sample_metadata, [*overrides, "trainer.max_steps=2"]))
    checkpoint = torch.load(result["checkpoint"], weights_only=True)
    # bitsandbytes packs its quantised moments into one dict per parameter in its state_dict.
    states = [state["__bnb_optimizer_quant_state__"] for state in checkpoint["optimizer_states"][0]["state"].values()]
    assert states and all(state["state1"].dtype == state["state2"].dtype == torch.uint8 for state in states)
    resumed = train(
        train_cfg(
            tmp_path,
            tiny_edit_path,
            sample_metadata,
            [*overrides, "trainer.max_steps=3", f"ckpt_path={result['run_dir']}"],
        )
    )
    assert torch.load(resumed["checkpoint"], weights_only=True)["global_step"] == 3
    assert STATE_BYTES_PER_PARAMETER["adamw8bit"] < STATE_BYTES_PER_PARAMETER["adamw"] / 3


def test_adamw8bit_without_bitsandbytes_is_refused_before_loading(monkeypatch):
    import fusedit.optim

    monkeypatch.setattr(fusedit.optim, "bitsandbytes_available", lambda: False)
    with pytest.raises(ConfigError, match=r"pip install 'fusedit\[lowmem\]'"):
        validate_train_config(compose_train(["optim=adamw8bit"]), check_paths=False)
