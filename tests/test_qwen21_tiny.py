"""`fusedit make-tiny --variant 2.1`: a tiny random Qwen-Image-2.1 pipeline that diffusers' own 2.1 modular pipeline
loads from the folder and runs (text-to-image and editing with references, 2 steps on CPU), with fusedit's merged
transformer in place of diffusers' giving the same images."""

import pytest
import torch
from PIL import Image

from fusedit.detect import detect
from fusedit.model import is_merged, load_transformer
from fusedit.tiny import make_tiny, tiny_variant
from tests.test_qwen21_merged import relative_error

STEPS = {"num_inference_steps": 2, "height": 64, "width": 64, "output_resolution": 64, "output_type": "pt"}


@pytest.fixture(scope="module")
def modular_pipeline(tiny_qwen21_path):
    from diffusers import ModularPipeline, QwenImage21ModularPipeline

    pipe = ModularPipeline.from_pretrained(str(tiny_qwen21_path))  # a Path loads no component
    assert isinstance(pipe, QwenImage21ModularPipeline)
    pipe.load_components(dtype=torch.float32)
    return pipe


def generate(pipe, **kwargs):
    return pipe(generator=torch.Generator().manual_seed(0), **STEPS, **kwargs, output="images")


def test_tiny_21_folder_is_a_qwen21_pipeline(tiny_qwen21_path):
    assert tiny_variant(tiny_qwen21_path) == "2.1"
    report = detect(tiny_qwen21_path)
    assert (report["family"], report["pipeline_class"], report["layout"]) == (
        "qwen-image-2.1",
        "QwenImage21Pipeline",
        "standard",
    )
    assert report["in_channels"] == 64
    for component in ("transformer", "vae", "text_encoder", "processor", "scheduler"):
        assert component in report["components"]


def test_modular_pipeline_generates_from_text_and_from_references(modular_pipeline):
    text_to_image = generate(modular_pipeline, prompt="a red cat")
    assert text_to_image.shape == (1, 4, 64, 64)  # RGBA and torch.isfinite(text_to_image).all()
    reference = Image.new("RGB", (64, 64), (200, 30, 30))
    edited = generate(modular_pipeline, prompt="make it blue", image=[reference, reference])
    assert edited.shape == (1, 4, 64, 64)  # RGBA and not torch.equal(edited, text_to_image)


def test_merged_transformer_runs_inside_diffusers_pipeline(modular_pipeline, tiny_qwen21_path):
    reference = Image.new("RGB", (64, 32), (20, 130, 30))
    expected = generate(modular_pipeline, prompt="a green field", image=reference)
    standard = modular_pipeline.transformer
    merged = load_transformer(tiny_qwen21_path, "merged_qkv")
    assert is_merged(merged)
    modular_pipeline.update_components(transformer=merged)
    try:
        actual = generate(modular_pipeline, prompt="a green field", image=reference)
    finally:
        modular_pipeline.update_components(transformer=standard)
    assert relative_error(actual, expected) <= 1e-4


def test_make_tiny_21_is_deterministic(tmp_path, tiny_qwen21_path):
    again = make_tiny(tmp_path / "again", "2.1")
    for name in ("transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        assert (again / name).read_bytes() == (tiny_qwen21_path / name).read_bytes()


def test_a_standard_lora_loads_through_diffusers_into_standard_and_merged_alike(
    modular_pipeline, tiny_qwen21_path, tmp_path
):
    from fusedit.convert import LoraModule, LoraWeights, write_lora

    generator = torch.Generator().manual_seed(0)
    modules = {}
    for leaf, out_features, alpha in (
        ("attn.to_q", 32, 4.0),
        ("attn.to_k", 32, 2.0),
        ("attn.to_v", 32, 4.0),
        ("img_mlp.gate_layer", 96, 2.0),
        ("img_mlp.proj", 96, 1.0),
    ):
        A, B = torch.randn(2, 32, generator=generator), 0.5 * torch.randn(out_features, 2, generator=generator)
        modules[f"transformer_blocks.1.{leaf}"] = LoraModule(A, B, alpha)
    write_lora(LoraWeights(modules), tmp_path / "lora.safetensors", "diffusers")

    base = generate(modular_pipeline, prompt="a cat")
    standard = modular_pipeline.transformer
    outputs = []
    try:
        for transformer in (standard, load_transformer(tiny_qwen21_path, "merged_qkv")):
            modular_pipeline.update_components(transformer=transformer)
            modular_pipeline.load_lora_weights(tmp_path / "lora.safetensors", adapter_name="test")
            outputs.append(generate(modular_pipeline, prompt="a cat"))
            modular_pipeline.unload_lora_weights()
    finally:
        modular_pipeline.update_components(transformer=standard)
    with_lora, merged_with_lora = outputs
    assert (with_lora - base).abs().max() > 0.05  # the LoRA changes the image
    # The merged model's load_lora_adapter merged q/k/v and gate/up exactly: same image, every strength kept.
    assert relative_error(merged_with_lora, with_lora) <= 1e-4
