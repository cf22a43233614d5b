"""fusedit.step: the bench steps through the trainer's step (same build, same precision, same loss and gradients)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from lightning.pytorch import Trainer
from torch import nn

from fusedit.bench.shapes import SHAPES, build_random_transformer, make_inputs
from fusedit.bench.variants import build_variant, make_step, parse_variant, variant_precision
from fusedit.lora.adapter import lora_parameters
from fusedit.step.build import stages_applied
from fusedit.step.config import LoraSpec, ModelConfig, typed_configs
from fusedit.step.precision import PRESETS, Precision
from fusedit.training.train import build_module
from tests.training_utils import CONF, compose_train

SHAPE = SHAPES["tiny"].replace(num_layers=2, target_size=(64, 64), edit_sizes=((64, 64),), text_tokens=12)


class GivenInputs(nn.Module):
    """A conditioner whose batch already is the encoding (as the cache's): {"inputs": EditInputs}."""

    scheduler_config: dict = {}

    def forward(self, batch):
        return batch["inputs"]


class RecordGradients(torch.optim.Optimizer):
    """An optimizer that only keeps the gradients it is stepped with."""

    def __init__(self, named: dict[str, nn.Parameter]):
        super().__init__(list(named.values()), {})
        self.names = list(named)
        self.grads: dict[str, torch.Tensor] = {}

    def step(self, closure=None):
        params = self.param_groups[0]["params"]
        self.grads = {name: p.grad.clone() for name, p in zip(self.names, params, strict=True) if p.grad is not None}


@pytest.mark.parametrize(
    ("variant_name", "precision", "overrides"),
    [
        ("merged", "fp32", []),
        ("merged+ckpt", "bf16", ["model.activation_checkpointing=1"]),
        ("standard", "bf16", ["model=standard"]),
    ],
)
def test_bench_step_is_the_trainers_step(tmp_path, variant_name, precision, overrides):
    variant, dtype = parse_variant(variant_name), {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    # The trainer loads the bench's random base from disk, in the precision config's base dtype.
    build_random_transformer(SHAPE, "cpu", dtype, seed=3).save_pretrained(tmp_path / "transformer")
    cfg = compose_train(
        [
            f"precision={precision}",
            f"lora.rank={SHAPE.lora_rank}",
            f"lora.alpha={SHAPE.lora_rank}",  # the bench's LoRA: alpha = rank
            f"lora.targets={SHAPE.lora_targets}",
            *overrides,
        ]
    )
    torch.manual_seed(0)
    module = build_module(cfg, tmp_path / "transformer", GivenInputs())
    trainer = Trainer(accelerator="cpu", precision=cfg.trainer.precision, logger=False, enable_checkpointing=False)
    bench_model = build_variant(variant, SHAPE, torch.device("cpu"), dtype, seed=3)
    assert stages_applied(bench_model) == stages_applied(module.transformer)

    trained = lora_parameters(module.transformer)
    benched = lora_parameters(bench_model)
    assert trained.keys() == benched.keys()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in trained.items():  # B = 0 at init would leave every A gradient zero
            parameter.normal_(0, 0.1, generator=generator)
            benched[name].copy_(parameter)
    assert {p.dtype for p in benched.values()} == {p.dtype for p in trained.values()}
    frozen = dict(module.transformer.named_parameters())
    for name, parameter in bench_model.named_parameters():
        assert torch.equal(parameter, frozen[name]), name

    inputs = make_inputs(SHAPE, "cpu", dtype, seed=3)
    # What Lightning runs: training_step in the precision plugin's context, backward outside it.
    with trainer.precision_plugin.train_step_context():
        trainer_loss = module.training_step({"inputs": inputs}, 0)
    trainer_loss.backward()
    trainer_grads = {name: p.grad for name, p in trained.items() if p.grad is not None}

    recorder = RecordGradients(benched)
    step = make_step(bench_model, inputs, variant, recorder, module.objective, dtype, seed=module._step_seed())
    bench_loss = step()
    assert trainer_loss.dtype == bench_loss.dtype == torch.float32
    # Equal up to float rounding (the two models are separate copies; CPU kernels may split work differently).
    torch.testing.assert_close(bench_loss, trainer_loss.detach(), rtol=1e-5, atol=1e-7)
    assert recorder.grads.keys() == trainer_grads.keys() and trainer_grads
    for name, grad in trainer_grads.items():
        torch.testing.assert_close(recorder.grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_precision_presets_are_the_config_files(name):
    assert typed_configs(compose_train([f"precision={name}"]))[2] == PRESETS[name]


def test_configs_are_typed_and_inherit_from_one_base():
    cfg = compose_train(["model=standard", "lora=attn", "precision=fp8"])
    model, lora, precision = typed_configs(cfg)
    assert isinstance(model, ModelConfig) and model.layout == "standard" and model.activation_checkpointing == 0
    assert isinstance(lora, LoraSpec) and (lora.targets, lora.rank, lora.alpha) == ("attn", 32, 32)
    assert isinstance(precision, Precision) and (precision.fp8, precision.lightning) == ("storage", "bf16-mixed")
    for group, option in [("model", "standard"), ("lora", "attn"), ("precision", "fp8")]:
        text = (CONF / group / f"{option}.yaml").read_text()
        assert "defaults:" in text and "_target_" not in text  # the option states only what differs


@pytest.mark.parametrize("override", ["+model.note=x", "+lora.ranks=4", "+precision.fp8_mode=storage"])
def test_a_key_the_typed_config_does_not_take_is_named(override):
    group, key = override[1:].split("=")[0].split(".")
    with pytest.raises(ValueError, match=rf"^{group}: unknown key\(s\) \['{key}'\]; \w+ takes \["):
        typed_configs(compose_train([override]))


@pytest.mark.parametrize(
    ("variant", "dtype", "preset"),
    [("merged", torch.bfloat16, "bf16"), ("merged+fp8", torch.bfloat16, "fp8"), ("merged", torch.float32, "fp32")],
)
def test_bench_precision_is_the_trainers_for_its_dtype(variant, dtype, preset):
    # The preset's name aside (the bench names its runs by variant), every setting is the config file's.
    assert dataclasses.replace(variant_precision(parse_variant(variant), dtype), name=preset) == PRESETS[preset]
