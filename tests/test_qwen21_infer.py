"""infer.py on the tiny Qwen-Image-2.1 (CPU, 2 steps, 64 px): diffusers' QwenImage21ModularPipeline with fusedit's
transformer inside, LoRAs in every format at their strength, editing with several references and text-to-image,
and the refusals made before anything loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from fusedit.convert import LoraModule, LoraWeights, write_lora
from fusedit.errors import UserInputError, refusals_as_one_line
from fusedit.inference.preflight import LoraSpec, preflight
from tests.test_qwen21_merged import relative_error

CONF = Path(__file__).resolve().parents[1] / "conf"
FAST = ["profile=cpu", "sampling.steps=2", "sampling.output_resolution=64"]
SAMPLE = {"num_inference_steps": 2, "seed": 0, "output_resolution": 64, "output_type": "pt"}


def cfg_for(model_path, *overrides: str):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose("infer", overrides=[*FAST, f"model.path={model_path}", *overrides])


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("references")
    rng = np.random.default_rng(0)
    paths = []
    for name, (width, height) in (("wide.png", (96, 64)), ("square.png", (64, 64))):
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(folder / name)
        paths.append(folder / name)
    return paths


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> LoraWeights:
    """A standard-layout LoRA on q/k/v and gate/up of block 1, ranks and alphas differing per module."""
    generator = torch.Generator().manual_seed(0)
    modules = {}
    for leaf, out_features, rank, alpha in (
        ("attn.to_q", 32, 2, 4.0),
        ("attn.to_k", 32, 2, 2.0),
        ("attn.to_v", 32, 4, 8.0),
        ("attn.to_out.0", 32, 2, 2.0),
        ("img_mlp.gate_layer", 96, 2, 1.0),
        ("img_mlp.proj", 96, 2, 4.0),
    ):
        A = torch.randn(rank, 32, generator=generator)
        B = 0.5 * torch.randn(out_features, rank, generator=generator)
        modules[f"transformer_blocks.1.{leaf}"] = LoraModule(A, B, alpha)
    return LoraWeights(modules)


@pytest.fixture(scope="module")
def sampler(tiny_qwen21_path):
    """One modular pipeline (VAE, Qwen3-VL, processor and scheduler loaded once) and `run(layout, specs)`: its image
    with a fresh transformer of `layout` carrying the LoRAs `specs`, as infer() loads them."""
    from fusedit.inference.lora import load_loras
    from fusedit.inference.qwen21 import pipeline_from_folder, sample
    from fusedit.model import load_transformer

    pipe = pipeline_from_folder(tiny_qwen21_path, load_transformer(tiny_qwen21_path, "standard"), torch.float32)
    reference = Image.new("RGB", (64, 32), (20, 130, 30))

    def run(layout: str, specs: list[LoraSpec], generate: bool = True, prompt="a green field", references=(reference,),
            **kwargs):  # fmt: skip
        transformer = load_transformer(tiny_qwen21_path, layout, dtype=torch.float32)
        records = load_loras(transformer, specs)
        pipe.update_components(transformer=transformer)
        image = sample(pipe, prompt, list(references), **{**SAMPLE, **kwargs}) if generate else None
        return image, transformer, records

    run.pipe = pipe
    return run


def test_merged_and_standard_give_the_same_image_with_a_lora_in_every_format(sampler, lora, tmp_path):
    standard = write_lora(lora, tmp_path / "diffusers.safetensors", "diffusers")
    # kohya (alpha tensors, underscored names), and fusedit's merged layout (to_qkv, gate_up_proj); comfyui: below.
    files = {"kohya": write_lora(lora, tmp_path / "kohya.safetensors", "kohya")}
    files["merged"] = write_lora(lora, tmp_path / "merged.safetensors", "diffusers", layout="merged_qkv")
    base, _, _ = sampler("merged_qkv", [])
    expected, _, _ = sampler("standard", [LoraSpec(str(standard), 0.7)])
    assert (expected - base).abs().max() > 0.05  # the LoRA changes the image
    for name, file in files.items():
        actual, _, records = sampler("merged_qkv", [LoraSpec(str(file), 0.7)])
        assert records[0]["applied_layout"] == "merged_qkv"
        assert relative_error(actual, expected) <= 1e-4, name


def test_the_pipeline_around_modules_in_memory_samples_what_the_folder_pipeline_samples(sampler, lora, tmp_path):
    """`pipeline_from_components` (training's validation images) shares the modules and gives the same image."""
    from fusedit.inference.qwen21 import pipeline_from_components, sample

    file = write_lora(lora, tmp_path / "lora.safetensors", "diffusers")
    expected, transformer, _ = sampler("merged_qkv", [LoraSpec(str(file))], references=(), prompt="a cat", seed=3)
    folder_pipe = sampler.pipe
    pipe = pipeline_from_components(transformer, folder_pipe.vae, folder_pipe.text_encoder, folder_pipe.processor,
                                    folder_pipe.scheduler)  # fmt: skip
    assert pipe.text_encoder is folder_pipe.text_encoder and pipe.transformer is transformer
    assert torch.equal(sample(pipe, "a cat", [], **{**SAMPLE, "seed": 3}), expected)
    # sampling.qwen21_true_cfg_scale > 1: diffusers' ClassifierFreeGuidance against the negative prompt.
    guided = sample(pipe, "a cat", [], **{**SAMPLE, "seed": 3}, guidance_scale=4.0, negative_prompt="blurry")
    assert pipe.guider.guidance_scale == 4.0 and pipe.requires_unconditional_embeds
    assert (guided - expected).abs().max() > 0.01


def test_a_lora_loads_at_the_strength_it_states_times_the_scale(sampler, lora, tmp_path):
    file = write_lora(lora, tmp_path / "kohya.safetensors", "kohya")  # alphas as tensors, one per module
    _, transformer, records = sampler("merged_qkv", [LoraSpec(str(file), 0.5, "mine")], generate=False)
    assert records[0]["alpha_over_rank"] == [0.5, 1.0, 2.0]
    block = transformer.transformer_blocks[1]

    def update(layer):
        return layer.scaling["mine"] * layer.lora_B["mine"].weight @ layer.lora_A["mine"].weight

    to_qkv, gate_up = update(block.attn.to_qkv), update(block.img_mlp.gate_up_proj)
    parts = [
        (to_qkv[:32], "attn.to_q"),
        (to_qkv[32:64], "attn.to_k"),
        (to_qkv[64:], "attn.to_v"),
        (gate_up[:96], "img_mlp.gate_layer"),  # gate first in the merged SwiGLU
        (gate_up[96:], "img_mlp.proj"),
    ]
    for loaded, leaf in parts:
        torch.testing.assert_close(loaded, 0.5 * lora.modules[f"transformer_blocks.1.{leaf}"].delta(), msg=leaf)


def test_infer_edits_with_several_references_and_generates_from_text(tiny_qwen21_path, references, lora, sampler,
                                                                      tmp_path, capfd):  # fmt: skip
    """infer() on a CSV (a two-reference edit row, a text-only row), with the 12gb profile's switches on the CPU
    (group offload of every component, fp8 weight storage, VAE tiling/slicing)."""
    from fusedit.inference.run import infer

    file = write_lora(lora, tmp_path / "lora.safetensors", "comfyui")
    table = tmp_path / "jobs.csv"
    table.write_text(
        f"edit_image,prompt\n{references[0]}|{references[1]},the cat of 1 on the sofa of 2\n,a red square\n"
    )
    cfg = cfg_for(tiny_qwen21_path, f"input={table}", "csv.allow_absolute_paths=true", f"output={tmp_path / 'out'}",
                  f"lora.path={file}", "lora.scale=0.8", "profile=12gb", "profile.device=cpu",
                  "profile.dtype=float32")  # fmt: skip
    capfd.readouterr()
    record = infer(cfg)
    bars = capfd.readouterr().err
    assert "[1/2] row0002" in bars and "[2/2] row0003" in bars, bars[-500:]  # the loop's bar, labelled per job
    assert record["profile"] | {"device": "cpu"} == {**record["profile"], "offload": "group", "fp8_storage": True}
    assert record["pipeline"] == "QwenImage21ModularPipeline" and record["layout"] == "merged_qkv"
    assert record["loras"][0]["scale"] == 0.8 and record["loras"][0]["format"] == "comfyui"
    edit, text_only = record["images"]
    assert (edit["mode"], len(edit["inputs"]), text_only["mode"]) == ("edit", 2, "text-to-image")
    with Image.open(edit["output"]) as image:  # the last reference's aspect (square) at output_resolution
        assert (image.mode, image.size) == ("RGBA", (64, 64))
    assert json.loads((tmp_path / "out" / "run.json").read_text())["family"] == "qwen-image-2.1"
    # The text-only job's image against sample() without the profile (fp32 weights, no hooks), same LoRA and seed:
    # fp8 storage rounds the weights, so close, not equal.
    expected, _, _ = sampler("merged_qkv", [LoraSpec(str(file), 0.8)], prompt="a red square", references=(), seed=1)
    with Image.open(text_only["output"]) as image:
        actual = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255
    assert 0 < (actual - expected).abs().mean() < 8 / 255


# ---------------------------------------------------------------------------------------- refused before loading
@pytest.mark.parametrize(
    "overrides,message",
    [
        (["preset=lightning4"], r"^preset=lightning4 is for the Qwen-Image MMDiT's Lightning LoRAs"),
        (["enhance_prompt=true"], r"^enhance_prompt=true rewrites with Qwen2.5-VL"),
        (["prompt=" + "a" * 9000], r": the prompt is 9\d{3} text tokens .* Qwen-Image-2.1's RoPE has 8187 text posi"),
    ],
)
def test_what_2_1_does_not_take_is_one_line_before_loading(tiny_qwen21_path, references, tmp_path, capsys,
                                                           overrides, message):  # fmt: skip
    cfg = cfg_for(tiny_qwen21_path, f"input={references[1]}", "prompt=x", f"output={tmp_path / 'o.png'}", *overrides)
    with pytest.raises(UserInputError, match=message):
        preflight(cfg)
    with pytest.raises(SystemExit) as exit_info, refusals_as_one_line():
        preflight(cfg)
    errors = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(errors) == 1 and errors[0].startswith("fusedit: error: "), errors


def test_model_and_sequential_offload_are_refused_for_2_1(tiny_qwen21_path):
    from fusedit.inference.preflight import check_family_options

    cfg = cfg_for(tiny_qwen21_path, "profile=24gb")  # on a CPU check_profile refuses it too: asked here alone
    with pytest.raises(UserInputError, match=r"^profile=24gb \(offload=model\) is not wired for Qwen-Image-2.1"):
        check_family_options(cfg, "qwen-image-2.1")


def test_profile_auto_picks_group_offload_for_2_1_where_it_picks_model_offload_otherwise():
    from fusedit.inference.profiles import auto_profile_name

    assert [auto_profile_name(gb, "qwen-image-2.1") for gb in (None, 85.1, 24.0, 12.9)] == [
        "cpu", "high_vram", "12gb", "12gb"
    ]  # fmt: skip
    assert auto_profile_name(24.0) == "24gb"


def test_a_long_prompt_is_truncated_to_the_2_1_positions_when_asked(tiny_qwen21_path, references, tmp_path):
    from fusedit.data.prompt_length import Qwen21PromptCounter

    long = "a" * 9000
    cfg = cfg_for(tiny_qwen21_path, f"input=[{references[0]},{references[1]}]", f"prompt={long}",
                  f"output={tmp_path / 'o.png'}", "long_prompt=truncate")  # fmt: skip
    (job,) = preflight(cfg).jobs
    # output_resolution 64: each reference 64x64 -> 4 positions; 8191 - 8 left for the text, template included.
    assert Qwen21PromptCounter(tiny_qwen21_path).count(job.prompt, [(96, 64), (64, 64)]) == 8183
    assert long.startswith(job.prompt)


def test_a_transformer_or_option_of_the_other_family_is_refused(tiny_qwen21_path, tiny_t2i_path, references, tmp_path):
    out = f"output={tmp_path / 'o.png'}"
    cfg = cfg_for(tiny_qwen21_path, f"input={references[1]}", "prompt=x", out, f"model.transformer={tiny_t2i_path}")
    with pytest.raises(UserInputError, match=r"is a Qwen-Image \(MMDiT\) transformer, but model.path is a qwen-im"):
        preflight(cfg)
    mmdit_lora = LoraWeights(
        {"transformer_blocks.0.attn.add_q_proj": LoraModule(torch.ones(1, 32), torch.ones(32, 1), 1.0)}
    )
    file = write_lora(mmdit_lora, tmp_path / "mmdit.safetensors")
    cfg = cfg_for(tiny_qwen21_path, f"input={references[1]}", "prompt=x", out, f"lora.path={file}")
    with pytest.raises(UserInputError, match=r"targets attn.add_q_proj, which a qwen-image-2.1 transformer does not"):
        preflight(cfg)
    cfg = cfg_for(tiny_t2i_path, "prompt=x", out)
    with pytest.raises(UserInputError, match=r"^sampling.output_resolution is Qwen-Image-2.1's"):
        preflight(cfg)


def test_diffusers_notices_about_its_own_api_are_not_printed_on_every_run():
    # Each 2.1 run and validation round builds a guider: diffusers warned "Guiders are currently an experimental
    # feature ..." every time (fusedit.inference.qwen21 drops that one message, nothing else).
    import logging

    from diffusers import ClassifierFreeGuidance

    import fusedit.inference.qwen21  # noqa: F401 (installs the filter)

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("diffusers.guiders.guider_utils")
    logger.addHandler(handler)
    try:
        ClassifierFreeGuidance(guidance_scale=2.0)
        logger.warning("another warning")
    finally:
        logger.removeHandler(handler)
    assert [record.getMessage() for record in records] == ["another warning"]
