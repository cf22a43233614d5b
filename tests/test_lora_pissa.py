"""lora.init=pissa | olora (PEFT): the start moves the base weight's principal part into the adapter, so the export
is the rank-2r LoRA s * [B | -B0] @ [A ; A0]; loaded into the stock model it gives the trained model's output, and on
the merged to_qkv the update still splits row-wise into exact q/k/v LoRAs."""

from __future__ import annotations

import pytest
import torch
from diffusers import QwenImageEditPipeline

from fusedit.convert import read_lora
from fusedit.lora import export_lora
from fusedit.step.build import build_transformer
from fusedit.step.config import LoraSpec, ModelConfig
from fusedit.step.precision import Precision
from fusedit.training.validate_config import ConfigError, validate_train_config
from tests.test_lora import _inputs, _randomise
from tests.training_utils import compose_train

BLOCK = "transformer_blocks.0.attn"


@pytest.mark.parametrize(("init", "layout"), [("pissa", "merged_qkv"), ("olora", "merged_qkv"), ("pissa", "standard")])
def test_exported_lora_on_the_stock_model_gives_the_trained_output(tmp_path, tiny_edit_path, init, layout):
    torch.manual_seed(0)
    spec = LoraSpec("attn", rank=2, alpha=4, init=init)
    trained = build_transformer(tiny_edit_path, ModelConfig(layout=layout), spec, Precision())
    pipe = QwenImageEditPipeline.from_pretrained(tiny_edit_path)
    stock = pipe.transformer
    qkv = "to_qkv" if layout == "merged_qkv" else "to_q"
    residual = trained.get_submodule(f"{BLOCK}.{qkv}").base_layer.weight
    original = stock.get_submodule(f"{BLOCK}.to_q").weight
    assert not torch.allclose(residual[: original.shape[0]], original)  # the init did move part of W
    _randomise(trained, seed=1)  # stands in for training: both factors move away from their start

    path = export_lora(trained, tmp_path / "final.safetensors")
    exported = read_lora(path)
    assert exported.layout == "standard" and exported.modules[f"{BLOCK}.to_q"].rank == 4  # 2r
    # Layer by layer: the original weight plus the exported update is the trained weight (W_res + s B A).
    trained_layer = trained.get_submodule(f"{BLOCK}.{qkv}")
    trained_weight = trained_layer.base_layer.weight + trained_layer.scaling["default"] * (
        trained_layer.lora_B["default"].weight @ trained_layer.lora_A["default"].weight
    )
    names = ("to_q", "to_k", "to_v") if layout == "merged_qkv" else ("to_q",)
    rebuilt = torch.cat(
        [stock.get_submodule(f"{BLOCK}.{name}").weight + exported.modules[f"{BLOCK}.{name}"].delta() for name in names]
    )
    torch.testing.assert_close(rebuilt, trained_weight, rtol=1e-5, atol=1e-6)

    with torch.no_grad():
        inputs = _inputs()
        expected = trained(**inputs)[0]
        before = stock(**inputs)[0]
        pipe.load_lora_weights(str(path))
        after = pipe.transformer(**inputs)[0]
    torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-5)
    assert (after - before).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["lora.init=pissa", "precision=fp8"], "fp8 storage cannot hold"),
        (["lora.init=olora", "lora.init_from=x.safetensors"], "not with lora.init_from"),
        (["lora.init=pissa_niter_0"], "pissa_niter_<k>"),
    ],
)
def test_base_changing_inits_that_cannot_run_are_refused_before_loading(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_train_config(compose_train(overrides), check_paths=False)


def test_pissa_niter_is_accepted():
    validate_train_config(compose_train(["lora.init=pissa_niter_4"]), check_paths=False)
