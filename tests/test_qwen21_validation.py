"""Validation images for Qwen-Image-2.1 from the latent cache: diffusers' 2.1 modular pipeline without its encoder
blocks, fed the cached encodings, gives the image the whole pipeline gives from the prompt and reference image."""

from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from fusedit.cache import CachedConditioner, CachedEditDataModule
from fusedit.step.build import build_transformer
from fusedit.step.config import LoraSpec, ModelConfig
from fusedit.step.precision import Precision
from tests.data_helpers import write_csv


def test_cached_qwen21_validation_samples_what_the_pipeline_samples(tmp_path, tiny_qwen21_path, monkeypatch, capfd):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import Qwen3VLForConditionalGeneration

    from fusedit.inference.qwen21 import pipeline_from_components, sample
    from fusedit.step.conditioning_qwen21 import Qwen21Conditioner

    generator = np.random.default_rng(0)
    for name in ("t", "e"):
        Image.fromarray(generator.integers(0, 256, (32, 64, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    metadata = write_csv(tmp_path / "m.csv", [["t.png", "e.png", "make it red"]])
    data = CachedEditDataModule(cache_dir=tmp_path / "cache", model_path=tiny_qwen21_path, metadata=metadata)
    data.setup()
    torch.manual_seed(0)
    transformer = build_transformer(tiny_qwen21_path, ModelConfig(), LoraSpec("attn_mlp", rank=4), Precision())
    with torch.no_grad():  # a LoRA that moves the output, as after training
        for name, parameter in transformer.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    module = SimpleNamespace(device=torch.device("cpu"), transformer=transformer)

    conditioner = CachedConditioner(tiny_qwen21_path)
    capfd.readouterr()
    with monkeypatch.context() as patch:  # from the cache: no Qwen3-VL
        patch.setattr(Qwen3VLForConditionalGeneration, "from_pretrained", None)
        ((reference, edited, target, prompt),) = conditioner.validation_rows(module, [data.train_dataset[0]], 2, 0)
    assert "it/s]" not in capfd.readouterr().err  # no denoise-loop progress bar in a training log
    assert prompt == "make it red" and reference.size == edited.size == target.size == (64, 32)

    live = Qwen21Conditioner.from_pretrained(tiny_qwen21_path)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(live.scheduler_config)
    pipe = pipeline_from_components(transformer, live.vae, live.text_encoder, live.processor, scheduler)
    expected = sample(pipe, prompt, [Image.open(tmp_path / "e.png")], num_inference_steps=2, seed=0, height=32,
                      width=64, output_resolution=round((64 * 32) ** 0.5))  # fmt: skip
    difference = np.abs(np.asarray(edited, dtype=float) - np.asarray(expected.convert("RGB"), dtype=float))
    assert difference.max() <= 1  # the cache encoded the reference from the same pixels (uint8 rounding aside)
    transformer.disable_adapters()
    base = sample(pipe, prompt, [Image.open(tmp_path / "e.png")], num_inference_steps=2, seed=0, height=32,
                  width=64, output_resolution=round((64 * 32) ** 0.5))  # fmt: skip
    assert np.abs(np.asarray(base.convert("RGB"), dtype=float) - np.asarray(edited, dtype=float)).max() > 1


def test_live_qwen21_validation_of_a_users_sample_takes_its_reference_size(tmp_path, tiny_qwen21_path):
    """A user's validation sample (an edit image, no target) is sampled at its reference's area and aspect."""
    from fusedit.step.conditioning_qwen21 import Qwen21Conditioner
    from fusedit.training.callbacks import ValidationImages

    Image.new("RGB", (64, 32), "blue").save(tmp_path / "cat.png")
    callback = ValidationImages(
        tmp_path / "samples", samples=[{"edit_image": "cat.png", "prompt": "make it red"}], base_path=tmp_path,
        num_inference_steps=2,
    )  # fmt: skip
    transformer = build_transformer(tiny_qwen21_path, ModelConfig(), LoraSpec("attn", rank=4), Precision())
    module = SimpleNamespace(
        device=torch.device("cpu"),
        transformer=transformer,
        conditioner=Qwen21Conditioner.from_pretrained(tiny_qwen21_path),
    )
    (row,) = callback.generate(None, module)
    assert row.target is None and row.prompt == "make it red" and row.inputs[0].size == row.edited.size == (64, 32)
