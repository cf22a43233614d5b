"""Detection of every kind from headers and configs alone."""

import argparse
import json

import pytest
import torch
from safetensors.torch import save_file

from fusedit import detect as detect_module
from fusedit.convert import LoraModule, LoraWeights, convert_checkpoint, write_lora
from fusedit.detect import detect
from tests.convert_utils import tiny_state_dict, tiny_transformer, write_header_only


def make_pipeline(root, pipeline_class, zero_cond_t=False, shard=None):
    model = tiny_transformer(zero_cond_t=zero_cond_t)
    model.save_pretrained(root / "transformer", **({"max_shard_size": shard} if shard else {}))
    index = {
        "_class_name": pipeline_class,
        "transformer": ["diffusers", "QwenImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLQwenImage"],
        "scheduler": [None, None],
    }
    (root / "model_index.json").write_text(json.dumps(index))
    return model


@pytest.mark.parametrize(
    "pipeline_class, zero_cond_t, family",
    [
        ("QwenImagePipeline", False, "qwen-image"),
        ("QwenImageEditPipeline", False, "qwen-image-edit"),
        ("QwenImageEditPlusPipeline", False, "qwen-image-edit-2509"),
        ("QwenImageEditPlusPipeline", True, "qwen-image-edit-2511"),
    ],
)
def test_pipeline_families(tmp_path, pipeline_class, zero_cond_t, family):
    model = make_pipeline(tmp_path, pipeline_class, zero_cond_t, shard="30KB")
    report = detect(tmp_path)
    assert report["kind"] == "pipeline" and report["family"] == family
    assert report["pipeline_class"] == pipeline_class
    assert report["layout"] == "standard"
    assert (report["layers"], report["hidden_size"], report["heads"], report["head_dim"]) == (2, 32, 2, 16)
    assert report["parameter_count"] == sum(p.numel() for p in model.parameters())
    assert report["dtype"] == "F32" and report["zero_cond_t"] is zero_cond_t
    assert report["components"] == ["transformer", "vae"]


def test_transformer_folder_both_layouts(tmp_path):
    make_pipeline(tmp_path / "pipe", "QwenImageEditPipeline", shard="30KB")
    report = detect(tmp_path / "pipe" / "transformer")
    assert report["kind"] == "transformer" and report["family"] == "qwen-image" and "share" in report["family_source"]
    convert_checkpoint(tmp_path / "pipe" / "transformer", tmp_path / "merged", "to_merged")
    merged = detect(tmp_path / "merged")
    assert merged["layout"] == "merged_qkv"
    assert merged["parameter_count"] == report["parameter_count"] and merged["layers"] == 2


def test_model_file_with_prefix_and_real_size_from_header_only(tmp_path, monkeypatch):
    save_file(tiny_state_dict(torch.bfloat16, prefix="model.diffusion_model."), tmp_path / "m.safetensors")
    report = detect(tmp_path / "m.safetensors")
    assert report["kind"] == "model_file" and report["key_prefix"] == "model.diffusion_model."
    assert report["dtype"] == "BF16" and report["heads"] == 2

    # the full 20B model's header with no data behind it: detection never reads a tensor
    from diffusers import QwenImageTransformer2DModel

    with torch.device("meta"):
        full = QwenImageTransformer2DModel(
            num_layers=60,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=3584,
            in_channels=64,
            out_channels=16,
        )
    write_header_only(tmp_path / "big.safetensors", {k: tuple(v.shape) for k, v in full.state_dict().items()})
    monkeypatch.setattr(detect_module, "load_safetensors", None)  # any tensor read would fail
    report = detect(tmp_path / "big.safetensors")
    assert (report["layers"], report["hidden_size"], report["heads"]) == (60, 3072, 24)
    assert report["parameter_count"] == sum(v.numel() for v in full.state_dict().values())
    assert 20e9 < report["parameter_count"] < 21e9


def test_lora_reports(tmp_path):
    D = 32
    modules = {
        f"transformer_blocks.{b}.attn.to_{x}": LoraModule(torch.zeros(4, D), torch.zeros(D, 4), 8.0)
        for b in range(2)
        for x in "qkv"
    }
    modules["transformer_blocks.1.img_mlp.net.0.proj"] = LoraModule(torch.zeros(2, D), torch.zeros(128, 2), 2.0)
    modules["transformer_blocks.1.attn.to_out.0"] = LoraModule(torch.zeros(4, D), torch.zeros(D, 4), 8.0)
    lora = LoraWeights(modules)
    write_lora(lora, tmp_path / "k.safetensors", "kohya")
    report = detect(tmp_path / "k.safetensors")
    assert report["kind"] == "lora" and report["format"] == "kohya" and report["layout"] == "standard"
    assert report["ranks"] == [2, 4] and report["rank"] is None and report["alphas"] == [2.0, 8.0]
    assert report["scales"] == [1.0, 2.0] and report["alpha_source"] == "alpha tensors"
    assert report["target_modules"] == ["attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v", "img_mlp.net.0.proj"]
    assert report["blocks"] == [0, 1] and report["num_modules"] == 8
    assert report["per_module"]["transformer_blocks.1.img_mlp.net.0.proj"] == {"rank": 2, "alpha": 2.0}

    write_lora(lora, tmp_path / "d.safetensors", "diffusers", layout="merged_qkv")
    report = detect(tmp_path / "d.safetensors")
    assert report["format"] == "diffusers" and report["layout"] == "merged_qkv" and report["alpha_source"] == "metadata"
    assert "attn.to_qkv" in report["target_modules"] and report["ranks"] == [2, 4]
    assert report["scales"] == [1.0, 2.0]  # alpha from the metadata, not assumed = rank


def test_not_qwen_is_refused_with_what_was_found(tmp_path):
    save_file({"down_blocks.0.conv.weight": torch.zeros(2)}, tmp_path / "sd.safetensors")
    with pytest.raises(ValueError, match=r"not a Qwen-Image transformer.*down_blocks\.0\.conv\.weight"):
        detect(tmp_path / "sd.safetensors")
    save_file({"lora_unet_down_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(1, 2)}, tmp_path / "l.safetensors")
    with pytest.raises(ValueError, match=r"no Qwen-Image transformer module: lora_unet_down_blocks"):
        detect(tmp_path / "l.safetensors")
    make_pipeline(tmp_path / "flux", "FluxPipeline")
    with pytest.raises(ValueError, match="'FluxPipeline' is not a Qwen-Image pipeline"):
        detect(tmp_path / "flux")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("x")
    with pytest.raises(ValueError, match="found readme.md"):
        detect(tmp_path / "empty")
    (tmp_path / "t.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .safetensors file"):
        detect(tmp_path / "t.bin")
    (tmp_path / "junk.safetensors").write_bytes(b"\x05" * 20)
    with pytest.raises(ValueError, match="not a safetensors file"):
        detect(tmp_path / "junk.safetensors")


def test_cli_prints_json(tmp_path, capsys):
    save_file(tiny_state_dict(), tmp_path / "m.safetensors")
    parser = argparse.ArgumentParser(prog="fusedit")
    detect_module.add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["detect", str(tmp_path / "m.safetensors")])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "model_file"
