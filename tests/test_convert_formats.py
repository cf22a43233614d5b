"""LoRA file formats: each import checked against a hand-built file, each export against diffusers' own loader."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fusedit.convert import LoraModule, LoraWeights, convert_lora_layout, read_lora, write_lora
from fusedit.convert.lora_formats import module_from_kohya
from tests.convert_utils import bf16_valued, exact_delta, tiny_transformer

D = 32
Q = "transformer_blocks.0.attn.to_q"
MLP = "transformer_blocks.1.img_mlp.net.0.proj"
OUT = "transformer_blocks.1.attn.to_out.0"
ADD = "transformer_blocks.0.attn.add_k_proj"
TOP = "norm_out.linear"


def factors(rank, out, seed):
    return bf16_valued((rank, D), seed), bf16_valued((out, rank), seed + 1)


# module -> (rank, out features); scales below are chosen per format so "forgot alpha" would show
SHAPES = {Q: (4, D), MLP: (2, 128), OUT: (8, D), ADD: (4, D), TOP: (2, 2 * D)}
FACTORS = {m: factors(r, o, i * 10) for i, (m, (r, o)) in enumerate(SHAPES.items())}


def check(lora: LoraWeights, expected_scales: dict[str, float], fmt: str):
    assert lora.format == fmt
    assert sorted(lora.modules) == sorted(SHAPES)
    for m, (A, B) in FACTORS.items():
        got = lora.modules[m]
        assert torch.equal(exact_delta(got.A, got.B, got.scale), exact_delta(A, B, expected_scales[m])), m


def test_kohya_names_map_back_for_every_qwen_module():
    assert (
        module_from_kohya("lora_unet_transformer_blocks_12_img_mlp_net_0_proj")
        == "transformer_blocks.12.img_mlp.net.0.proj"
    )
    assert module_from_kohya("lora_unet_transformer_blocks_0_attn_add_q_proj") == "transformer_blocks.0.attn.add_q_proj"
    assert module_from_kohya("lora_unet_transformer_blocks_3_attn_to_add_out") == "transformer_blocks.3.attn.to_add_out"
    assert module_from_kohya("lora_unet_transformer_blocks_3_attn_to_out_0") == "transformer_blocks.3.attn.to_out.0"
    assert module_from_kohya("lora_unet_time_text_embed_timestep_embedder_linear_2") == (
        "time_text_embed.timestep_embedder.linear_2"
    )
    assert module_from_kohya("lora_unet_down_blocks_0_attn") is None


def test_import_kohya(tmp_path):
    # musubi-tuner style: alpha as a (bf16) scalar per module; one module without alpha means alpha = rank
    sd, scales = {}, {}
    for i, (m, (A, B)) in enumerate(FACTORS.items()):
        name = "lora_unet_" + m.replace(".", "_")
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = A.bfloat16(), B.bfloat16()
        if m != TOP:
            sd[f"{name}.alpha"] = torch.tensor(float(i + 1), dtype=torch.bfloat16)
        scales[m] = (i + 1) / A.shape[0] if m != TOP else 1.0
    save_file(sd, tmp_path / "k.safetensors", {"ss_network_dim": "4"})
    lora = read_lora(tmp_path / "k.safetensors")
    check(lora, scales, "kohya")
    assert lora.metadata["ss_network_dim"] == "4"


def test_import_comfyui(tmp_path):
    sd = {}
    for m, (A, B) in FACTORS.items():
        sd[f"diffusion_model.{m}.lora_A.weight"], sd[f"diffusion_model.{m}.lora_B.weight"] = A, B
        sd[f"diffusion_model.{m}.alpha"] = torch.tensor(1.0)  # the "alpha = 1" convention: scale 1/rank
    save_file(sd, tmp_path / "c.safetensors")
    check(read_lora(tmp_path / "c.safetensors"), {m: 1.0 / r for m, (r, _) in SHAPES.items()}, "comfyui")


def test_import_diffusers_with_and_without_metadata(tmp_path):
    sd = {}
    for m, (A, B) in FACTORS.items():
        sd[f"transformer.{m}.lora_A.weight"], sd[f"transformer.{m}.lora_B.weight"] = A, B
    save_file(sd, tmp_path / "plain.safetensors")
    check(read_lora(tmp_path / "plain.safetensors"), dict.fromkeys(SHAPES, 1.0), "diffusers")  # no alpha: scale 1
    config = {
        "transformer.r": 4,
        "transformer.lora_alpha": 16,
        "transformer.rank_pattern": {MLP: 2, OUT: 8, TOP: 2},
        "transformer.alpha_pattern": {OUT: 2, TOP: 1},
        "transformer.target_modules": sorted(SHAPES),
    }
    save_file(sd, tmp_path / "meta.safetensors", {"format": "pt", "lora_adapter_metadata": json.dumps(config)})
    scales = {Q: 4.0, ADD: 4.0, MLP: 8.0, OUT: 0.25, TOP: 0.5}
    check(read_lora(tmp_path / "meta.safetensors"), scales, "diffusers")
    config["transformer.rank_pattern"] = {}
    save_file(sd, tmp_path / "wrong.safetensors", {"lora_adapter_metadata": json.dumps(config)})
    with pytest.raises(ValueError, match=r"has rank 2 but its LoRA config says 4"):
        read_lora(tmp_path / "wrong.safetensors")


def test_import_peft_folder_and_diffsynth(tmp_path):
    folder = tmp_path / "peft"
    folder.mkdir()
    sd = {}
    for m, (A, B) in FACTORS.items():
        sd[f"base_model.model.{m}.lora_A.weight"], sd[f"base_model.model.{m}.lora_B.weight"] = A, B
    save_file(sd, folder / "adapter_model.safetensors")
    config = {"r": 4, "lora_alpha": 2, "rank_pattern": {MLP: 2, OUT: 8, TOP: 2}, "alpha_pattern": {}}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    check(read_lora(folder), {m: 2 / r for m, (r, _) in SHAPES.items()}, "peft")

    sd = {}
    for m, (A, B) in FACTORS.items():
        sd[f"{m}.lora_A.default.weight"], sd[f"{m}.lora_B.default.weight"] = A, B
    save_file(sd, tmp_path / "d.safetensors")
    check(read_lora(tmp_path / "d.safetensors"), dict.fromkeys(SHAPES, 1.0), "diffsynth")


@pytest.mark.parametrize("fmt", ["diffusers", "peft", "diffsynth", "comfyui", "kohya"])
@pytest.mark.parametrize("layout", ["standard", "merged_qkv"])
def test_export_and_reimport_keeps_every_product(tmp_path, fmt, layout):
    alphas = {Q: 1.0, MLP: 8.0, OUT: 8.0, ADD: 2.0, TOP: 3.0}  # alpha != rank almost everywhere
    lora = LoraWeights({m: LoraModule(A, B, alphas[m]) for m, (A, B) in FACTORS.items()})
    for p in ("to_k", "to_v"):  # complete q/k/v so a merged export has something to merge
        lora.modules[Q.replace("to_q", p)] = LoraModule(*factors(4, D, hash(p) % 97), 1.0)
    if fmt in ("comfyui", "kohya") and layout == "merged_qkv":
        with pytest.raises(ValueError, match=r"cannot be written in the merged_qkv layout"):
            write_lora(lora, tmp_path / f"{fmt}.safetensors", fmt, layout)
        assert not (tmp_path / f"{fmt}.safetensors").exists()
        return
    path = write_lora(lora, tmp_path / f"{fmt}.safetensors", fmt, layout)
    keys = load_file(path).keys()
    has_alpha_keys = any(k.endswith(".alpha") for k in keys)
    assert has_alpha_keys == (fmt in ("comfyui", "kohya"))  # the others fold the scale into lora_B
    back = read_lora(path)
    assert back.format == fmt and back.layout == layout
    if layout == "merged_qkv":
        back = convert_lora_layout(back, "to_standard")
    for m, original in lora.modules.items():
        got = back.modules[m]
        assert torch.equal(exact_delta(got.A, got.B, got.scale), exact_delta(original.A, original.B, original.scale))
        # a folded scale that is a power of two is taken back out exactly; 3/2 (TOP) stays folded with alpha = rank
        if fmt in ("comfyui", "kohya") or m != TOP:
            assert got.alpha == original.alpha and got.rank == original.rank, m
        else:
            assert got.alpha == got.rank and torch.equal(got.A, original.A), m


def test_comfyui_and_kohya_exports_of_a_merged_lora_come_out_standard(tmp_path):
    lora = LoraWeights({Q.replace("to_q", "to_qkv"): LoraModule(*factors(4, 3 * D, 3), 8.0)})
    for fmt in ("comfyui", "kohya"):
        back = read_lora(write_lora(lora, tmp_path / f"{fmt}.safetensors", fmt))
        assert back.layout == "standard" and sorted(back.modules) == sorted(
            Q.replace("to_q", p) for p in ("to_q", "to_k", "to_v")
        )
        split = convert_lora_layout(lora, "to_standard")
        for m, mod in split.modules.items():
            assert torch.equal(back.modules[m].B, mod.B) and back.modules[m].alpha == 8.0, m


@pytest.mark.parametrize("fmt", ["diffusers", "comfyui", "kohya", "diffsynth"])
def test_diffusers_pipeline_loads_export_with_the_right_strength(tmp_path, fmt):
    from diffusers import QwenImageEditPipeline

    model = tiny_transformer(seed=1)
    alphas = {Q: 1.0, MLP: 8.0, OUT: 3.0, ADD: 2.0, TOP: 6.0}
    lora = LoraWeights({m: LoraModule(A, B, alphas[m]) for m, (A, B) in FACTORS.items()})
    path = write_lora(lora, tmp_path / "lora.safetensors", fmt)
    pipe = QwenImageEditPipeline(
        scheduler=None, vae=None, text_encoder=None, tokenizer=None, processor=None, transformer=model
    )
    pipe.load_lora_weights(str(path), adapter_name="x")
    modules = dict(model.named_modules())
    for m, mod in lora.modules.items():
        layer = modules[m]
        delta = (layer.lora_B["x"].weight @ layer.lora_A["x"].weight).double() * layer.scaling["x"]
        # diffusers folds .alpha into the factors for comfyui/kohya (an fp32 multiply): allow that rounding
        torch.testing.assert_close(delta, exact_delta(mod.A, mod.B, mod.scale), rtol=1e-6, atol=1e-6)
    # and end to end through one patched Linear: output moves by exactly x @ delta.T
    x = torch.randn(3, D)
    layer = modules[Q]
    with torch.no_grad():
        lifted = layer(x)
        pipe.disable_lora()
        base = layer(x)
    q = lora.modules[Q]
    torch.testing.assert_close(lifted - base, (x @ (q.B @ q.A).T) * q.scale, rtol=1e-5, atol=1e-5)


def test_transformer_load_lora_adapter_reads_peft_export(tmp_path):
    model = tiny_transformer(seed=2)
    lora = LoraWeights({m: LoraModule(A, B, 5.0) for m, (A, B) in FACTORS.items()})
    path = write_lora(lora, tmp_path / "lora.safetensors", "peft")
    # use_safetensors=True: without it (and without weight_name) diffusers reads the file with no metadata
    model.load_lora_adapter(str(path), prefix=None, adapter_name="p", use_safetensors=True)
    layer = dict(model.named_modules())[OUT]
    assert layer.scaling["p"] == 1.0  # the scale 5/8 is folded into lora_B: no reader can miss it
    mod = lora.modules[OUT]
    torch.testing.assert_close(
        (layer.lora_B["p"].weight @ layer.lora_A["p"].weight).double() * layer.scaling["p"],
        exact_delta(mod.A, mod.B, mod.scale),
        rtol=1e-6,
        atol=1e-6,
    )


def test_import_a_lora_saved_by_diffusers_itself(tmp_path):
    """The real client: PEFT adapter on diffusers' model, saved with the pipeline's save_lora_weights."""
    from diffusers import QwenImageEditPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    model = tiny_transformer(seed=4)
    config = LoraConfig(
        r=4,
        lora_alpha=2,
        target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        rank_pattern={"to_out.0": 8},
        alpha_pattern={"to_k": 6},
    )
    model.add_adapter(config, adapter_name="default")
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param)
    QwenImageEditPipeline.save_lora_weights(
        tmp_path,
        transformer_lora_layers=get_peft_model_state_dict(model),
        transformer_lora_adapter_metadata=config.to_dict(),
    )
    lora = read_lora(tmp_path / "pytorch_lora_weights.safetensors")
    assert lora.format == "diffusers"
    layers = {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert sorted(lora.modules) == sorted(layers)
    for name, layer in layers.items():
        expected = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).double()
        expected = expected * layer.scaling["default"]
        got = lora.modules[name]
        assert got.scale == layer.scaling["default"], name
        torch.testing.assert_close(exact_delta(got.A, got.B, got.scale), expected, rtol=1e-6, atol=1e-6)
