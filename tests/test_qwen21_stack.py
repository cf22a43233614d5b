"""Qwen-Image-2.1 through fusedit's stack: LoRA target names, exact model and LoRA conversion (both directions,
files included), `fusedit detect` and `load_transformer`."""

import copy

import pytest
import torch
from diffusers import QwenImage21Transformer2DModel
from safetensors.torch import load_file, save_file

from fusedit.convert import LoraModule, LoraWeights, convert_checkpoint, convert_state_dict, read_lora, write_lora
from fusedit.detect import detect
from fusedit.lora.targets import resolve_targets
from fusedit.model import is_merged, load_transformer
from fusedit.model.merged_qwen21 import fuse_projections
from tests.convert_utils import assert_bit_equal
from tests.test_qwen21_merged import make_inputs, relative_error, tiny_qwen21

QWEN21 = "qwen-image-2.1"


def test_lora_targets_translate_between_layouts():
    assert resolve_targets("attn_mlp", "standard", QWEN21) == [
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "img_mlp.gate_layer",
        "img_mlp.proj",
        "img_mlp.out",
    ]
    assert resolve_targets("attn_mlp", "merged_qkv", QWEN21) == [
        "to_qkv",
        "to_out.0",
        "img_mlp.gate_up_proj",
        "img_mlp.out",
    ]
    assert resolve_targets(["img_mlp.gate_layer", "attn.to_k"], "merged_qkv", QWEN21) == [
        "img_mlp.gate_up_proj",
        "to_qkv",
    ]
    assert resolve_targets("full", "standard", QWEN21) == resolve_targets("attn_mlp", "standard", QWEN21)
    with pytest.raises(ValueError, match=r"unknown LoRA target\(s\) \['add_q_proj'\] for Qwen-Image-2.1"):
        resolve_targets(["add_q_proj"], "standard", QWEN21)
    with pytest.raises(ValueError, match=r"unknown LoRA target\(s\) \['img_mlp.proj'\] for Qwen-Image\."):
        resolve_targets(["img_mlp.proj"], "standard")  # the MMDiT has no such Linear


def test_add_lora_targets_the_merged_21_projections():
    from fusedit.lora.adapter import add_lora

    model = fuse_projections(tiny_qwen21())
    add_lora(model, rank=2, targets="attn_mlp")
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in model.named_parameters() if ".lora_A" in name}
    assert adapted == {
        f"transformer_blocks.{i}.{leaf}"
        for i in range(2)
        for leaf in ("attn.to_qkv", "attn.to_out.0", "img_mlp.gate_up_proj", "img_mlp.out")
    }


def test_model_state_dict_converts_exactly_both_ways():
    for dtype in (torch.float32, torch.bfloat16):
        standard = tiny_qwen21().to(dtype)
        merged_sd, _ = convert_state_dict(standard.state_dict(), "to_merged")
        expected = fuse_projections(copy.deepcopy(standard)).state_dict()
        assert set(merged_sd) == set(expected)
        assert all(torch.equal(merged_sd[key], expected[key]) for key in expected)
        back, _ = convert_state_dict(merged_sd, "to_standard")
        assert_bit_equal(back, standard.state_dict())


def random_lora(generator):
    """A standard-layout 2.1 LoRA whose q/k/v and gate/up parts differ in rank and alpha."""
    modules = {}
    for leaf, rank, alpha in (
        ("attn.to_q", 2, 4.0),
        ("attn.to_k", 3, 3.0),
        ("attn.to_v", 2, 8.0),
        ("attn.to_out.0", 2, 2.0),
        ("img_mlp.gate_layer", 2, 2.0),
        ("img_mlp.proj", 4, 2.0),
    ):
        out_features = 96 if leaf.startswith("img_mlp") else 32
        A = torch.randn(rank, 32, generator=generator)
        B = torch.randn(out_features, rank, generator=generator)
        modules[f"transformer_blocks.1.{leaf}"] = LoraModule(A, B, alpha)
    return LoraWeights(modules)


def test_lora_converts_exactly_and_keeps_every_strength(tmp_path):
    lora = random_lora(torch.Generator().manual_seed(0))
    write_lora(lora, tmp_path / "standard.safetensors")
    report = convert_checkpoint(tmp_path / "standard.safetensors", tmp_path / "merged.safetensors", "to_merged")
    assert report["output_layout"] == "merged_qkv"
    merged = read_lora(tmp_path / "merged.safetensors")
    assert set(merged.modules) == {
        "transformer_blocks.1.attn.to_qkv",
        "transformer_blocks.1.attn.to_out.0",
        "transformer_blocks.1.img_mlp.gate_up_proj",
    }
    # The merged deltas are the parts' deltas stacked (strength kept per part).
    parts = {
        "attn.to_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
        "img_mlp.gate_up_proj": ("img_mlp.gate_layer", "img_mlp.proj"),
    }
    for merged_leaf, part_leaves in parts.items():
        stacked = torch.cat([lora.modules[f"transformer_blocks.1.{leaf}"].delta() for leaf in part_leaves])
        assert relative_error(merged.modules[f"transformer_blocks.1.{merged_leaf}"].delta(), stacked) <= 1e-6
    convert_checkpoint(tmp_path / "merged.safetensors", tmp_path / "back.safetensors", "to_standard")
    # kohya names (underscores) map back to 2.1's modules; the format's reader gives the same LoRA.
    convert_checkpoint(tmp_path / "merged.safetensors", tmp_path / "kohya.safetensors", format="kohya")
    assert "lora_unet_transformer_blocks_1_img_mlp_gate_layer.lora_down.weight" in load_file(
        tmp_path / "kohya.safetensors"
    )
    for path in ("back.safetensors", "kohya.safetensors"):
        back = read_lora(tmp_path / path)
        assert set(back.modules) == set(lora.modules)
        for name, module in lora.modules.items():  # bit for bit: the merge record restores ranks, factors, alphas
            assert torch.equal(back.modules[name].A, module.A) and torch.equal(back.modules[name].B, module.B), name
            assert back.modules[name].scale == module.scale, name


@pytest.fixture(scope="module")
def saved_21(tmp_path_factory):
    """A tiny 2.1 transformer saved by diffusers (standard layout), and the model."""
    model = tiny_qwen21()
    path = tmp_path_factory.mktemp("qwen21") / "transformer"
    model.save_pretrained(path)
    return path, model


def test_detect_names_the_family_and_layout(saved_21, tmp_path):
    path, model = saved_21
    report = detect(path)
    assert (report["kind"], report["family"], report["layout"]) == ("transformer", QWEN21, "standard")
    assert (report["layers"], report["heads"], report["head_dim"], report["in_channels"]) == (2, 2, 16, 8)
    merged = fuse_projections(copy.deepcopy(model)).state_dict()
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in merged.items()}, tmp_path / "m.safetensors")
    report = detect(tmp_path / "m.safetensors")
    assert (report["kind"], report["family"], report["layout"]) == ("model_file", QWEN21, "merged_qkv")


def test_load_transformer_and_convert_round_trip_files_bit_exact(saved_21, tmp_path):
    path, model = saved_21
    merged = load_transformer(path, "merged_qkv")
    assert isinstance(merged, QwenImage21Transformer2DModel) and is_merged(merged)
    inputs = make_inputs(1)
    with torch.no_grad():
        assert relative_error(merged(**inputs).sample, model(**inputs).sample) <= 1e-5

    # save_pretrained of the merged model writes the standard layout, which stock diffusers loads.
    merged.save_pretrained(tmp_path / "saved")
    stock = QwenImage21Transformer2DModel.from_pretrained(tmp_path / "saved")
    assert all(torch.equal(stock.state_dict()[k], v) for k, v in model.state_dict().items())

    # fusedit convert: transformer folder both ways, bit for bit; the merged folder loads in either layout.
    convert_checkpoint(path, tmp_path / "merged", "to_merged")
    assert detect(tmp_path / "merged")["layout"] == "merged_qkv"
    convert_checkpoint(tmp_path / "merged", tmp_path / "back", "to_standard")
    original = load_file(path / "diffusion_pytorch_model.safetensors")
    back = load_file(tmp_path / "back" / "diffusion_pytorch_model.safetensors")
    assert_bit_equal(back, original)
    from_merged_folder = load_transformer(tmp_path / "merged", "standard")
    assert all(torch.equal(from_merged_folder.state_dict()[k], v) for k, v in model.state_dict().items())

    # A single merged file with a checkpoint prefix and no config: the config comes from its shapes.
    single = {f"model.diffusion_model.{k}": v.contiguous() for k, v in merged.state_dict().items()}
    save_file(single, tmp_path / "single.safetensors")
    from_single = load_transformer(tmp_path / "single.safetensors", "standard")
    assert isinstance(from_single, QwenImage21Transformer2DModel)
    assert all(torch.equal(from_single.state_dict()[k], v) for k, v in model.state_dict().items())
