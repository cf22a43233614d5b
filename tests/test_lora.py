"""LoRA targets (named layouts, translation between QKV layouts, clear errors) and the exported file: it loads in
stock diffusers' QwenImageEditPipeline with the trained strength (alpha != rank, rsLoRA) and changes its output."""

from __future__ import annotations

import pytest
import torch
from diffusers import QwenImageEditPipeline
from PIL import Image
from safetensors import safe_open

from fusedit.convert import read_lora
from fusedit.lora import add_lora, export_lora, lora_parameters, resolve_targets
from fusedit.lora.targets import ATTN_MLP, VALID_TARGETS
from fusedit.model import load_transformer
from fusedit.step.build import (
    STAGES,
    activation_checkpointing,
    build_transformer,
    compile_blocks,
    fp8_storage,
    load,
)
from fusedit.step.config import LoraSpec, ModelConfig
from fusedit.step.precision import Precision


def test_named_layouts_translate_to_each_model_layout():
    assert resolve_targets("attn", "merged_qkv") == ["to_qkv", "add_qkv_proj"]
    assert resolve_targets("attn", "standard") == ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"]
    standard = resolve_targets("attn_mlp", "standard")
    assert "to_qkv" not in standard and {"to_q", "to_out.0", "img_mlp.net.2"} <= set(standard)
    assert resolve_targets("full", "merged_qkv") == [*ATTN_MLP, "img_mod.1", "txt_mod.1"]
    # Targets written for one layout work on the other; dotted and comma-separated spellings are accepted.
    assert resolve_targets(["to_q", "to_k", "to_v"], "merged_qkv") == ["to_qkv"]
    assert resolve_targets("attn.to_qkv,to_out.0", "standard") == ["to_q", "to_k", "to_v", "to_out.0"]
    assert resolve_targets(["attn", "proj_out"], "merged_qkv") == ["to_qkv", "add_qkv_proj", "proj_out"]


def test_unknown_target_lists_the_valid_names():
    with pytest.raises(ValueError, match="unknown LoRA target") as error:
        resolve_targets(["to_qkv", "to_kqv"], "merged_qkv")
    message = str(error.value)
    assert "to_kqv" in message and "attn_mlp" in message
    assert all(name in message for name in VALID_TARGETS)
    with pytest.raises(ValueError, match="empty"):
        resolve_targets([], "standard")
    with pytest.raises(ValueError, match="layout"):
        resolve_targets("attn", "fused")


def test_add_lora_validates_its_arguments(tiny_edit_path):
    model = load_transformer(tiny_edit_path, "merged_qkv")
    with pytest.raises(ValueError, match="rank must be >= 1"):
        add_lora(model, rank=0)
    with pytest.raises(ValueError, match="init"):
        add_lora(model, rank=4, init="svd")
    with pytest.raises(ValueError, match="alpha"):
        add_lora(model, rank=4, alpha=-1)
    add_lora(model, rank=4, targets="attn")
    assert set(lora_parameters(model)) == {n for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(ValueError, match="already carries"):
        add_lora(model, rank=4)


def test_build_order_is_enforced(tiny_edit_path):
    assert STAGES == ("load", "fuse", "fp8", "lora", "stream", "activation_checkpointing", "compile")
    model = build_transformer(tiny_edit_path, ModelConfig(), LoraSpec("attn", rank=2), Precision())
    with pytest.raises(RuntimeError, match="must run before"):
        fp8_storage(model)  # quantising after LoRA would swap the base layer under PEFT's wrapper
    model = activation_checkpointing(load(tiny_edit_path, "merged_qkv"), every=2)
    from fusedit.step.build import lora

    with pytest.raises(RuntimeError, match="must run before"):
        lora(model, rank=2)
    with pytest.raises(RuntimeError, match="already applied"):
        activation_checkpointing(model)
    assert compile_blocks is not None


def test_fp8_storage_then_lora_trains_only_the_lora(tiny_edit_path):
    from fusedit.model.fp8 import FP8_DTYPE

    precision = Precision(base_dtype="bfloat16", fp8="storage", fp8_granularity="row", compute_dtype="bfloat16")
    model = build_transformer(tiny_edit_path, ModelConfig(), LoraSpec("attn_mlp", rank=2), precision)
    base = model.transformer_blocks[0].attn.to_qkv.base_layer
    assert base.weight.dtype == FP8_DTYPE
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and p.dtype == torch.float32 for n, p in trainable.items())


def _randomise(model, seed=0, std=0.2):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in sorted(lora_parameters(model).items()):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


def _inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(1, 2, 2), (1, 2, 2)]
    return {
        "hidden_states": torch.randn(1, 8, 64, generator=generator),
        "encoder_hidden_states": torch.randn(1, 5, 32, generator=generator),
        "encoder_hidden_states_mask": None,
        "timestep": torch.tensor([0.6]),
        "img_shapes": [shapes],
        "return_dict": False,
    }


@pytest.mark.parametrize(
    ("layout", "lora_kwargs"),
    [
        ("merged_qkv", {"rank": 4, "alpha": 16}),
        ("standard", {"rank": 4, "alpha": 2}),
        ("merged_qkv", {"rank": 4, "alpha": 8, "use_rslora": True}),
    ],
)
def test_exported_lora_loads_in_diffusers_with_the_trained_strength(tmp_path, tiny_edit_path, layout, lora_kwargs):
    trained = build_transformer(
        tiny_edit_path, ModelConfig(layout=layout), LoraSpec("attn_mlp", **lora_kwargs), Precision()
    )
    _randomise(trained)
    path = export_lora(trained, tmp_path / "final.safetensors", step="7")

    with safe_open(str(path), "pt") as handle:
        keys = list(handle.keys())
        metadata = handle.metadata()
    assert all(key.startswith("transformer.") and ".default." not in key for key in keys)
    assert not any(".to_qkv." in key or ".add_qkv_proj." in key for key in keys)
    assert "lora_adapter_metadata" in metadata and metadata["step"] == "7"

    pipe = QwenImageEditPipeline.from_pretrained(tiny_edit_path)
    with torch.no_grad():
        inputs = _inputs()
        before = pipe.transformer(**inputs)[0]
        expected = trained(**inputs)[0]  # PEFT's own forward, with its own alpha / r (or / sqrt(r)) scaling
        pipe.load_lora_weights(str(path))
        after = pipe.transformer(**inputs)[0]
    torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-5)
    assert (after - before).abs().max() > 1e-3

    if layout != "merged_qkv" or lora_kwargs.get("use_rslora"):
        return  # the end-to-end check below runs once
    # And end to end: the stock pipeline's edit changes once the LoRA is in.
    image = Image.new("RGB", (32, 32), (40, 160, 90))
    call = {"image": image, "prompt": "make it red", "height": 32, "width": 32, "num_inference_steps": 2}
    with_lora = pipe(**call, generator=torch.Generator().manual_seed(0), output_type="np").images
    pipe.unload_lora_weights()
    without = pipe(**call, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert abs(with_lora - without).max() > 1e-3


def test_merged_layout_copy_is_the_same_update(tmp_path, tiny_edit_path):
    for source in ("merged_qkv", "standard"):
        trained = build_transformer(
            tiny_edit_path, ModelConfig(layout=source), LoraSpec("attn", rank=2, alpha=4), Precision()
        )
        _randomise(trained, seed=3)
        standard = read_lora(export_lora(trained, tmp_path / f"{source}.safetensors", "standard"))
        merged = read_lora(export_lora(trained, tmp_path / f"{source}.merged.safetensors", "merged_qkv"))
        assert standard.layout == "standard" and merged.layout == "merged_qkv"
        block = "transformer_blocks.0.attn"
        merged_delta = merged.modules[f"{block}.to_qkv"].delta()
        split = torch.cat([standard.modules[f"{block}.{name}"].delta() for name in ("to_q", "to_k", "to_v")])
        torch.testing.assert_close(merged_delta, split, rtol=1e-5, atol=1e-6)
