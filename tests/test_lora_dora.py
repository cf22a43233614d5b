"""lora.type=dora (PEFT's use_dora): trained on either QKV layout, exported in the standard layout with the
magnitude vector split by rows (exact: DoRA's norm is per output row), and stock diffusers loads it with the trained
output; the combinations DoRA, LoKr and LoHa cannot run are refused before loading."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import QwenImageEditPipeline
from safetensors import safe_open

from fusedit.convert import read_lora
from fusedit.errors import UserInputError
from fusedit.lora import export_lora, lora_parameters
from fusedit.step.build import build_transformer
from fusedit.step.config import LoraSpec, ModelConfig
from fusedit.step.precision import Precision
from fusedit.training.validate_config import ConfigError, validate_train_config
from tests.test_lora import _inputs, _randomise
from tests.training_utils import compose_train

BLOCK = "transformer_blocks.0.attn"


@pytest.mark.parametrize("layout", ["merged_qkv", "standard"])
def test_dora_export_loads_in_diffusers_with_the_trained_output(tmp_path, tiny_edit_path, layout):
    torch.manual_seed(0)
    trained = build_transformer(
        tiny_edit_path, ModelConfig(layout=layout), LoraSpec("attn", rank=2, alpha=4, type="dora"), Precision()
    )
    assert any("lora_magnitude_vector" in name for name in lora_parameters(trained))  # the magnitude trains too
    _randomise(trained, seed=2, std=0.3)  # factors and magnitudes away from their start, as training moves them

    path = export_lora(trained, tmp_path / "final.safetensors")
    with safe_open(str(path), "pt") as handle:
        keys = set(handle.keys())
        config = json.loads(handle.metadata()["lora_adapter_metadata"])
        magnitude_q = handle.get_tensor(f"transformer.{BLOCK}.to_q.lora_magnitude_vector")
    assert config["transformer.use_dora"] and not any("qkv" in key for key in keys)
    if layout == "merged_qkv":  # the stacked magnitude's first third is q's
        merged = trained.get_submodule(f"{BLOCK}.to_qkv").lora_magnitude_vector["default"].weight
        assert torch.equal(magnitude_q, merged[: magnitude_q.shape[0]])

    pipe = QwenImageEditPipeline.from_pretrained(tiny_edit_path)
    with torch.no_grad():
        inputs = _inputs()
        expected = trained(**inputs)[0]
        before = pipe.transformer(**inputs)[0]
        pipe.load_lora_weights(str(path))
        after = pipe.transformer(**inputs)[0]
    torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-5)
    assert (after - before).abs().max() > 1e-3

    # fusedit's own reader (inference, conversion) refuses it by name instead of applying the factors alone.
    with pytest.raises(UserInputError, match="DoRA magnitude"):
        read_lora(path)


def test_dora_export_refuses_the_merged_layout(tmp_path, tiny_edit_path):
    trained = build_transformer(tiny_edit_path, ModelConfig(), LoraSpec("attn", rank=2, type="dora"), Precision())
    with pytest.raises(ValueError, match="standard layout only"):
        export_lora(trained, tmp_path / "x.safetensors", layout="merged_qkv")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["lora.type=lokr", "lora.init=pissa"], "lora.type=lokr starts from PEFT's own initialisation"),
        (["lora.type=loha", "lora.dropout=0.1"], "lora.type=loha has no input dropout"),
        (["lora.type=loha", "lora.use_rslora=true"], "set lora.use_rslora=false"),
        (["lora.type=lokr", "precision=fp8"], "lora.type=lokr needs an nn.Linear base"),
        (["lora.type=loha", "callbacks.lora_export.merged_copy=true"], "loha is exported in the standard layout only"),
        (["lora.type=lokr", "callbacks.lora_export.layout=merged_qkv"], "lokr is exported in the standard layout"),
        (["lora.decompose_factor=4"], "lora.decompose_factor is LoKr's"),
        (["lora.type=lokr", "lora.decompose_factor=0"], "lora.decompose_factor must be -1 or an integer >= 1"),
        (["lora.type=vera"], "lora.type must be one of"),
        (["lora.type=dora", "precision=fp8"], "not fp8"),
        (["lora.type=dora", "lora.init=pissa"], "not with lora.init=pissa/olora"),
        (["lora.type=dora", "callbacks.lora_export.merged_copy=true"], "standard layout only"),
    ],
)
def test_adapter_types_that_cannot_run_are_refused_before_loading(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_train_config(compose_train(overrides), check_paths=False)
