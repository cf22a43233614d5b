"""train.py on the tiny Qwen-Image-2.1: trains, draws validation images, exports a standard-layout LoRA that
diffusers' 2.1 pipeline loads with its strength and that changes its output."""

import pytest
import torch

from fusedit.data import make_sample_dataset
from fusedit.training.train import train
from tests.training_utils import train_cfg


@pytest.fixture(scope="module")
def qwen21_run(tmp_path_factory, tiny_qwen21_path) -> dict:
    tmp_path = tmp_path_factory.mktemp("qwen21-run")
    metadata = make_sample_dataset(tmp_path / "data", n=2, size=64)
    # alpha != rank: the exported strength (alpha / r = 2) must reach diffusers. A validation round at step 2.
    overrides = ["trainer.max_steps=2", "lora.alpha=8", "data.val_count=1", "callbacks.validation_images.num_samples=1"]
    overrides += ["callbacks.validation_images.every_n_steps=2", "callbacks.validation_images.num_inference_steps=2"]
    return train(train_cfg(tmp_path, tiny_qwen21_path, metadata, overrides))


def test_validation_images_during_qwen21_training(qwen21_run):
    """The held-out row sampled by diffusers' 2.1 modular pipeline with the trained LoRA: input | output | target
    at the row's size (64 x 64), its prompt below."""
    from PIL import Image

    from fusedit.training.callbacks import PROMPT_HEIGHT

    samples = qwen21_run["run_dir"] / "samples"
    assert sorted(path.name for path in samples.iterdir()) == ["step-000002.png"]
    sheet = Image.open(samples / "step-000002.png")
    assert sheet.size == (3 * 64, 14 + 64 + PROMPT_HEIGHT)


def test_train_py_trains_qwen21_and_exports_the_standard_layout(qwen21_run):
    from fusedit.convert import read_lora

    assert torch.isfinite(torch.tensor(qwen21_run["metrics"]["train/loss"]))
    lora = read_lora(qwen21_run["lora_path"])
    assert lora.layout == "standard"
    names = set(lora.modules)
    assert {"transformer_blocks.0.attn.to_q", "transformer_blocks.0.img_mlp.gate_layer"} <= names
    assert not any("to_qkv" in name or "gate_up_proj" in name for name in names)


def test_exported_lora_loads_in_diffusers_qwen21_pipeline_and_changes_its_output(qwen21_run, tiny_qwen21_path):
    from diffusers import ModularPipeline

    pipe = ModularPipeline.from_pretrained(str(tiny_qwen21_path))
    pipe.load_components(dtype=torch.float32)

    def generate():
        return pipe(prompt="make the square red", num_inference_steps=2, height=64, width=64, output_resolution=64,
                    generator=torch.Generator().manual_seed(0), output="images")  # fmt: skip

    base = torch.tensor(list(generate()[0].getdata()), dtype=torch.float32)
    pipe.load_lora_weights(str(qwen21_run["lora_path"]), adapter_name="trained")
    # The strength (lora_alpha 8 / r 4 = 2) is kept: diffusers' update equals the trained one read back by fusedit.
    from fusedit.convert import read_lora

    trained = read_lora(qwen21_run["lora_path"]).modules["transformer_blocks.0.attn.to_q"]
    assert trained.alpha == 8.0
    to_q = pipe.transformer.transformer_blocks[0].attn.to_q
    loaded = to_q.scaling["trained"] * to_q.lora_B["trained"].weight @ to_q.lora_A["trained"].weight
    torch.testing.assert_close(loaded, trained.delta(), rtol=1e-6, atol=1e-8)
    pipe.set_adapters(["trained"], [1000.0])  # 2 steps move the LoRA little: scale it far above float noise
    changed = torch.tensor(list(generate()[0].getdata()), dtype=torch.float32)
    assert (changed - base).abs().max() > 1
