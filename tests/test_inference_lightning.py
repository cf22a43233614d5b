"""Few-step inference presets (preset=lightning4 / lightning8): every preset composes with every profile, the
Lightning presets give the model card's scheduler config and no CFG, and a tiny run with the Lightning LoRA and a
user's LoRA on top samples 4 steps and gives diffusers' own image for the same scheduler and adapters."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline
from hydra import compose, initialize_config_dir
from PIL import Image

from fusedit.convert import LoraModule, LoraWeights, write_lora
from fusedit.errors import UserInputError
from fusedit.inference.preflight import preflight

CONF = Path(__file__).resolve().parents[1] / "conf"
PRESETS = sorted(path.stem for path in (CONF / "preset").glob("*.yaml"))
PROFILES = sorted(path.stem for path in (CONF / "profile").glob("*.yaml"))

# The model card's diffusers example (huggingface.co/lightx2v/Qwen-Image-Lightning, README), written out here
# independently of conf/preset/lightning*.yaml so that a wrong preset value fails.
CARD_SCHEDULER = {
    "base_image_seq_len": 256,
    "base_shift": math.log(3),
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": math.log(3),
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": None,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}


def compose_infer(*overrides: str):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose("infer", overrides=list(overrides))


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_with_every_profile(preset, profile):
    cfg = compose_infer(f"preset={preset}", f"profile={profile}", "model.path=/m", "prompt=x")
    assert cfg.sampling.name == preset and cfg.profile.name == profile
    assert compose_infer(f"preset={preset}", "sampling.steps=7").sampling.steps == 7  # the command line wins


@pytest.mark.parametrize("steps", [4, 8])
def test_lightning_presets_are_the_model_cards_settings(steps):
    sampling = compose_infer(f"preset=lightning{steps}").sampling
    assert sampling.steps == steps and sampling.true_cfg_scale == 1.0  # CFG off
    assert dict(sampling.scheduler) == CARD_SCHEDULER
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(dict(sampling.scheduler))
    assert scheduler.config.time_shift_type == "exponential" and scheduler.config.use_dynamic_shifting
    # mu = ln 3 at any resolution: the exponential time shift is the static shift 3 the LoRA was distilled with.
    # (The Qwen pipelines pass sigmas linspace(1, 1/steps, steps).)
    sigmas = np.linspace(1.0, 1 / steps, steps)
    scheduler.set_timesteps(sigmas=sigmas, mu=math.log(3))
    static = FlowMatchEulerDiscreteScheduler(shift=3.0)
    static.set_timesteps(sigmas=sigmas)
    torch.testing.assert_close(scheduler.sigmas, static.sigmas)


def random_lora(
    model_path: Path, path: Path, seed: int, modules=("attn.to_q", "attn.add_v_proj", "attn.to_out.0")
) -> Path:
    """A standard-layout LoRA with random A and B on a few attention layers of every block of the tiny model."""
    import json

    config = json.loads((model_path / "transformer" / "config.json").read_text())
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    generator = torch.Generator().manual_seed(seed)
    weights = {
        f"transformer_blocks.{block}.{name}": LoraModule(
            torch.randn(4, inner, generator=generator), torch.randn(inner, 4, generator=generator), 4.0
        )
        for block in range(config["num_layers"])
        for name in modules
    }
    return write_lora(LoraWeights(weights), path, format="diffusers")


def test_lightning_preset_needs_the_lightning_lora(tiny_t2i_path, tmp_path):
    cfg = compose_infer("preset=lightning4", f"model.path={tiny_t2i_path}", "prompt=x", f"output={tmp_path}")
    with pytest.raises(UserInputError, match=r"preset=lightning4 .* sampling.lightning_lora="):
        preflight(cfg)


def test_lightning4_with_a_user_lora_on_top_runs_4_steps_as_diffusers_does(tiny_t2i_path, tmp_path, monkeypatch):
    from fusedit.inference.run import infer

    lightning = random_lora(tiny_t2i_path, tmp_path / "lightning.safetensors", seed=1)
    mine = random_lora(tiny_t2i_path, tmp_path / "mine.safetensors", seed=2, modules=("attn.to_k", "attn.add_q_proj"))
    steps = []
    original_step = FlowMatchEulerDiscreteScheduler.step

    def counting_step(scheduler, *args, **kwargs):
        steps.append(scheduler.config.time_shift_type)
        return original_step(scheduler, *args, **kwargs)

    monkeypatch.setattr(FlowMatchEulerDiscreteScheduler, "step", counting_step)
    cfg = compose_infer(
        "preset=lightning4", "profile=cpu", "sampling.height=64", "sampling.width=64",
        f"sampling.lightning_lora={lightning}", f"lora.path={mine}", "lora.scale=0.5",
        f"model.path={tiny_t2i_path}", "prompt=a red cube", f"output={tmp_path / 'out.png'}",
    )  # fmt: skip
    record = infer(cfg)
    assert steps == ["exponential"] * 4
    assert [(lora["name"], lora["scale"]) for lora in record["loras"]] == [("lightning", 1.0), ("mine", 0.5)]
    assert record["scheduler"]["time_shift_type"] == "exponential" and record["scheduler"]["shift"] == 1.0

    # diffusers' own: the card's scheduler, both LoRAs through load_lora_weights, the same scales, 4 steps, no CFG.
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(CARD_SCHEDULER)
    pipe = QwenImagePipeline.from_pretrained(str(tiny_t2i_path), scheduler=scheduler, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lightning), adapter_name="lightning")
    pipe.load_lora_weights(str(mine), adapter_name="mine")
    pipe.set_adapters(["lightning", "mine"], adapter_weights=[1.0, 0.5])
    steps.clear()
    reference = pipe(
        prompt="a red cube", negative_prompt=" ", true_cfg_scale=1.0, num_inference_steps=4, height=64, width=64,
        generator=torch.Generator("cpu").manual_seed(0),
    ).images[0]  # fmt: skip
    assert len(steps) == 4
    ours = np.asarray(Image.open(tmp_path / "out.png").convert("RGB"), dtype=np.int16)
    assert np.abs(ours - np.asarray(reference, dtype=np.int16)).max() <= 1
    pipe.set_adapters(["lightning"], adapter_weights=[1.0])  # the user's LoRA matters
    without_mine = pipe(
        prompt="a red cube", negative_prompt=" ", true_cfg_scale=1.0, num_inference_steps=4, height=64, width=64,
        generator=torch.Generator("cpu").manual_seed(0),
    ).images[0]  # fmt: skip
    assert np.abs(ours - np.asarray(without_mine, dtype=np.int16)).max() > 5
