"""lora.type=dora (PEFT's use_dora): trained on either QKV layout, exported with the magnitude vector split by rows
(exact: DoRA's norm is per output row); stock diffusers and fusedit's own loader (infer.py) apply it with the trained
output on either layout and at another strength as diffusers does; `fusedit convert` keeps it exactly in the formats
that hold it and refuses the others; the combinations DoRA, LoKr and LoHa cannot run are refused before loading."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import QwenImageEditPipeline
from safetensors import safe_open

from fusedit.convert import TO_MERGED, TO_STANDARD, LoraWeights, convert_lora_layout, read_lora, write_lora
from fusedit.detect import detect
from fusedit.errors import UserInputError
from fusedit.inference.lora import LoraSpec as InferenceLora
from fusedit.inference.lora import load_loras
from fusedit.lora import export_lora, lora_parameters
from fusedit.model import load_transformer
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

    # fusedit's own reader keeps the magnitudes, and infer.py's load_loras applies the file on either layout with
    # the trained output, and at another strength as diffusers does.
    assert read_lora(path).adapter_type == "dora" and detect(path)["adapter_type"] == "dora"
    pipe.set_adapters(pipe.get_active_adapters(), [0.5])
    with torch.no_grad():
        half = pipe.transformer(**inputs)[0]
    for target_layout in ("merged_qkv", "standard"):
        for strength, want in ((1.0, expected), (0.5, half)):
            model = load_transformer(tiny_edit_path, layout=target_layout)
            load_loras(model, [InferenceLora(str(path), strength)])
            with torch.no_grad():
                torch.testing.assert_close(model(**inputs)[0], want, rtol=1e-4, atol=1e-5)


def test_a_dora_file_converts_exactly_where_the_format_holds_it_and_is_refused_elsewhere(tmp_path, tiny_edit_path):
    torch.manual_seed(0)
    trained = build_transformer(
        tiny_edit_path, ModelConfig(), LoraSpec("attn", rank=2, alpha=4, type="dora"), Precision()
    )
    _randomise(trained, seed=3, std=0.3)
    original = read_lora(export_lora(trained, tmp_path / "final.safetensors"))
    for fmt in ("diffusers", "peft"):
        for layout in ("standard", "merged_qkv"):
            written = write_lora(original, tmp_path / f"{fmt}-{layout}.safetensors", fmt, layout)
            back = convert_lora_layout(read_lora(written), TO_STANDARD)
            assert back.adapter_type == "dora" and back.modules.keys() == original.modules.keys()
            for name, mod in original.modules.items():
                got = back.modules[name]
                assert torch.equal(got.magnitude, mod.magnitude), (fmt, layout, name)
                assert torch.equal(got.A, mod.A) and torch.equal(got.B, mod.B) and got.alpha == mod.alpha
    for fmt in ("comfyui", "kohya", "diffsynth"):
        with pytest.raises(UserInputError, match=f"a DoRA LoRA cannot be written as {fmt}: "):
            write_lora(original, tmp_path / f"{fmt}.safetensors", fmt)

    # Merging needs every part's magnitude: a DoRA LoRA without to_k cannot become a to_qkv one.
    partial = LoraWeights({name: mod for name, mod in original.modules.items() if not name.endswith("to_k")})
    with pytest.raises(UserInputError, match="DoRA LoRA on .*to_q.*to_v only"):
        convert_lora_layout(partial, TO_MERGED)


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
    ],
)
def test_adapter_types_that_cannot_run_are_refused_before_loading(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_train_config(compose_train(overrides), check_paths=False)
