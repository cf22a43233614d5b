"""optim=adamw8bit: bitsandbytes' 8-bit AdamW over the LoRA parameters, its checkpoints and its refusal."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fusedit.data import make_sample_dataset
from fusedit.optim import STATE_BYTES_PER_PARAMETER
from fusedit.training.train import train
from fusedit.training.validate_config import ConfigError, validate_train_config
from tests.training_utils import compose_train, train_cfg


@pytest.fixture(scope="module")
def sample_metadata(tmp_path_factory) -> Path:
    return make_sample_dataset(tmp_path_factory.mktemp("data"), n=2, size=32)


def test_adamw8bit_trains_keeps_8bit_moments_and_resumes(tmp_path, tiny_edit_path, sample_metadata):
    pytest.importorskip("bitsandbytes", reason="optim=adamw8bit needs bitsandbytes (the lowmem / dev extra)")
    overrides = [
        "optim=adamw8bit",
        "optim.optimizer.min_8bit_size=0",
        "callbacks.model_checkpoint.every_n_train_steps=1",
    ]
    result = train(train_cfg(tmp_path, tiny_edit_path, sample_metadata, [*overrides, "trainer.max_steps=2"]))
    checkpoint = torch.load(result["checkpoint"], weights_only=True)
    # bitsandbytes packs its quantised moments into one dict per parameter in its state_dict.
    states = [state["__bnb_optimizer_quant_state__"] for state in checkpoint["optimizer_states"][0]["state"].values()]
    assert states and all(state["state1"].dtype == state["state2"].dtype == torch.uint8 for state in states)
    resumed = train(
        train_cfg(
            tmp_path,
            tiny_edit_path,
            sample_metadata,
            [*overrides, "trainer.max_steps=3", f"ckpt_path={result['run_dir']}"],
        )
    )
    assert torch.load(resumed["checkpoint"], weights_only=True)["global_step"] == 3
    assert STATE_BYTES_PER_PARAMETER["adamw8bit"] < STATE_BYTES_PER_PARAMETER["adamw"] / 3


def test_adamw8bit_without_bitsandbytes_is_refused_before_loading(monkeypatch):
    import fusedit.optim

    monkeypatch.setattr(fusedit.optim, "bitsandbytes_available", lambda: False)
    with pytest.raises(ConfigError, match=r"pip install 'fusedit\[lowmem\]'"):
        validate_train_config(compose_train(["optim=adamw8bit"]), check_paths=False)


# ---------------------------------------------------------------------------------------------------- every optimizer
# The optimizers that run on CPU (adamw8bit has its own test above): each trains, checkpoints with weights_only and
# resumes to the very weights of an uninterrupted run.
CPU_OPTIMIZERS = ["adamw", "prodigy", "adafactor", "schedulefree"]


@pytest.fixture(scope="module")
def conditioner(tiny_edit_path):
    from fusedit.step.conditioning import EditConditioner

    return EditConditioner.from_pretrained(tiny_edit_path)


@pytest.fixture(scope="module")
def batch(sample_metadata) -> dict:
    from fusedit.data import EditDataModule

    datamodule = EditDataModule(sample_metadata, batch_size=2, shuffle=False)
    datamodule.setup()
    return next(iter(datamodule.train_dataloader()))


def lora_module(tiny_edit_path, conditioner, optim: str, overrides=()):
    """The training module with conf/optim/<optim>.yaml's optimizer and schedule, on a small attention LoRA."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from fusedit.step.build import build_transformer
    from fusedit.step.config import LoraSpec, ModelConfig
    from fusedit.step.objective import FlowMatchObjective
    from fusedit.step.precision import Precision
    from fusedit.training.module import EditLoRAModule

    cfg = compose_train([f"optim={optim}", *overrides])
    torch.manual_seed(0)
    transformer = build_transformer(tiny_edit_path, ModelConfig(), LoraSpec("attn", rank=2, alpha=2), Precision())
    return EditLoRAModule(
        transformer,
        conditioner,
        FlowMatchObjective(),
        instantiate(cfg.optim.optimizer),
        OmegaConf.to_container(cfg.optim.scheduler, resolve=True),
    )


def fit(module, batch, max_steps: int, ckpt_path=None, callbacks=()):
    from lightning.pytorch import Trainer

    trainer = Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )
    loader = torch.utils.data.DataLoader([batch] * 8, batch_size=None)
    trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_path, weights_only=True)
    return trainer


def lora_state(module) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in module.state_dict().items()}


@pytest.mark.parametrize("optim", CPU_OPTIMIZERS)
def test_each_optimizer_resumes_to_the_weights_of_an_uninterrupted_run(
    tmp_path, tiny_edit_path, conditioner, batch, optim
):
    module = lora_module(tiny_edit_path, conditioner, optim)
    start = lora_state(module)
    fit(module, batch, 3)
    uninterrupted = lora_state(module)

    first = lora_module(tiny_edit_path, conditioner, optim)
    fit(first, batch, 2).save_checkpoint(tmp_path / "step2.ckpt")
    checkpoint = torch.load(tmp_path / "step2.ckpt", weights_only=True)
    assert checkpoint["optimizer_states"][0]["state"], f"{optim}: no optimizer state saved"
    resumed = lora_module(tiny_edit_path, conditioner, optim)
    fit(resumed, batch, 3, ckpt_path=tmp_path / "step2.ckpt")

    for name, value in uninterrupted.items():
        assert not torch.equal(value, start[name]) or ".lora_B." not in name  # it trained
        torch.testing.assert_close(lora_state(resumed)[name], value, rtol=0, atol=0, msg=f"{optim}: {name}")


def test_resume_without_the_optimizer_state_would_differ(tmp_path, tiny_edit_path, conditioner, batch):
    # The resume test above can fail: Prodigy's step size estimate d lives in its state, and a run that restarts it
    # at step 2 ends elsewhere.
    module = lora_module(tiny_edit_path, conditioner, "prodigy")
    fit(module, batch, 2)
    first = lora_module(tiny_edit_path, conditioner, "prodigy")
    fit(first, batch, 1)
    restarted = lora_module(tiny_edit_path, conditioner, "prodigy")
    restarted.load_state_dict(first.state_dict())
    fit(restarted, batch, 1)
    name = next(name for name in lora_state(module) if ".lora_B." in name)
    assert not torch.allclose(lora_state(restarted)[name], lora_state(module)[name])


def test_schedule_free_exports_its_averaged_point_and_trains_at_its_own(tmp_path, tiny_edit_path, conditioner, batch):
    from safetensors.torch import load_file

    from fusedit.lora.adapter import export_lora
    from fusedit.optim import evaluation_mode
    from fusedit.training.callbacks import LoRAExport

    module = lora_module(tiny_edit_path, conditioner, "schedulefree")
    trainer = fit(module, batch, 2, callbacks=[LoRAExport(tmp_path / "lora")])
    optimizer = trainer.optimizers[0]
    assert optimizer.param_groups[0]["train_mode"]  # left as the next step needs it
    export_lora(module.transformer, tmp_path / "y.safetensors")
    with evaluation_mode(trainer.optimizers):
        assert not optimizer.param_groups[0]["train_mode"]
        export_lora(module.transformer, tmp_path / "x.safetensors")
    exported, x, y = (
        load_file(tmp_path / name) for name in ("lora/final.safetensors", "x.safetensors", "y.safetensors")
    )
    # The export left y exactly as it was (restored from a copy, not lerped back): x computed again is the same.
    assert all(torch.equal(exported[key], x[key]) for key in x)
    assert max((x[key] - y[key]).abs().max() for key in x) > 1e-6


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim=schedulefree", "optim.scheduler.name=cosine"], "optim.scheduler.name must be constant"),
        (["optim=schedulefree", "callbacks=ema"], "already averages"),
        (["callbacks=ema", "callbacks.ema.decay=1.0"], r"callbacks.ema.decay must be a number in \[0, 1\)"),
    ],
)
def test_optimizer_combinations_that_cannot_run_are_refused_before_loading(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_train_config(compose_train(overrides), check_paths=False)


@pytest.mark.parametrize("optim", ["prodigy", "schedulefree"])
def test_missing_optimizer_package_is_refused_with_the_install_hint(monkeypatch, optim):
    import importlib.util

    find_spec = importlib.util.find_spec
    package = {"prodigy": "prodigyopt", "schedulefree": "schedulefree"}[optim]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else find_spec(name, *a))
    with pytest.raises(ConfigError, match=rf"optim={optim} needs {package}: pip install 'fusedit\[optim\]'"):
        validate_train_config(compose_train([f"optim={optim}"]), check_paths=False)


def test_adamw_is_not_fused_so_lightning_can_clip_its_gradients():
    from lightning.fabric.plugins.precision.amp import _optimizer_handles_unscaling

    from fusedit.optim import adamw

    device = "cuda" if torch.cuda.is_available() else "cpu"
    optimizer = adamw([torch.nn.Parameter(torch.zeros(2, device=device))], lr=1e-3, betas=[0.9, 0.999])
    # Lightning's MixedPrecision.clip_gradients raises for an optimizer that unscales in its own step (fused).
    assert not _optimizer_handles_unscaling(optimizer)
    assert optimizer.defaults["betas"] == (0.9, 0.999)  # a plain tuple: weights_only checkpoints load it


def test_trainer_auto_keeps_the_chosen_optimizer(tmp_path, tiny_edit_path, sample_metadata, monkeypatch):
    import fusedit.plan.config as plan_config
    from fusedit.plan import plan_order
    from tests.training_utils import train_cfg

    # Only AdamW has a smaller sibling on the ladder; Prodigy stays Prodigy on every rung (and is what is predicted).
    assert {plan.optim for plan in plan_order(60, eight_bit=True, optim="prodigy")} == {"prodigy"}
    assert {plan.optim for plan in plan_order(60, eight_bit=True)} == {"adamw", "adamw8bit"}
    monkeypatch.setattr(plan_config, "_gpu_run", lambda cfg: True)
    cfg = train_cfg(tmp_path, tiny_edit_path, sample_metadata, ["plan.gpu_gb=80", "optim=prodigy"])
    record = plan_config.resolve_training_plan(cfg)
    assert record["plan"]["optim"] == "prodigy" and cfg.optim.name == "prodigy"
    assert cfg.optim.optimizer._target_ == "fusedit.optim.prodigy"
