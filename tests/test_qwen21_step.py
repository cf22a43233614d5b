"""Qwen-Image-2.1 training step: diffusers' conditioning, loss on the target tokens, merged == standard."""

import pytest
import torch

from fusedit.step.build import build_transformer
from fusedit.step.conditioning_qwen21 import Qwen21Conditioner
from fusedit.step.config import LoraSpec, ModelConfig
from fusedit.step.loss import EditLoss
from fusedit.step.objective import FlowMatchObjective
from fusedit.step.precision import Precision

# Same module names in both layouts, so the LoRA parameters (and their gradients) pair up by name; the gradient
# still flows back through the merged to_qkv / gate_up_proj of every block.
TARGETS = "to_out.0,img_mlp.out,img_in,proj_out"


@pytest.fixture(scope="module")
def conditioner(tiny_qwen21_path):
    return Qwen21Conditioner.from_pretrained(tiny_qwen21_path, dtype=torch.float32)


def _batch(references: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    image = lambda h, w: torch.rand(1, 3, h, w, generator=generator) * 2 - 1  # noqa: E731
    return {
        "image": image(64, 96),
        "edit_images": [image(64, 64) for _ in range(references)],
        "prompt": ["make the cat red"],
        "row": torch.tensor([3]),
    }


def _transformer(path, layout):
    model = ModelConfig(path=str(path), layout=layout)
    spec = LoraSpec(rank=4, alpha=4, targets=TARGETS)
    transformer = build_transformer(path, model, spec, Precision())
    generator = torch.Generator().manual_seed(1)
    for _name, parameter in sorted(transformer.named_parameters(), key=lambda item: item[0]):
        if parameter.requires_grad:  # B starts at zero: random factors make every gradient non-trivial
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.1
    return transformer


def test_conditioning_follows_the_pipeline_layout(conditioner):
    inputs = conditioner(_batch(references=2))
    assert inputs.target.shape == (1, 4 * 6, 64) and inputs.condition.shape == (1, 2 * 16, 64)
    assert inputs.img_shapes == [[(1, 4, 4), (1, 4, 4), (1, 4, 6)]]  # references first, target last
    assert inputs.image_slots.sum().item() == 2 * 16 // 4  # one Qwen3-VL slot per 2x2 latent tokens
    text_only = conditioner(_batch(references=0))
    assert text_only.condition.shape[1] == 0 and text_only.image_slots.sum().item() == 0


@pytest.mark.parametrize("references", [0, 2])
def test_merged_and_standard_steps_give_equal_loss_and_gradients(tiny_qwen21_path, conditioner, references):
    inputs = conditioner(_batch(references))
    step = EditLoss(FlowMatchObjective(scheduler_config=conditioner.scheduler_config))
    results = {}
    for layout in ("standard", "merged_qkv"):
        transformer = _transformer(tiny_qwen21_path, layout)
        loss, sigmas = step.loss(transformer, inputs, seed=7, rows=[3])
        loss.backward()
        grads = {n: p.grad for n, p in transformer.named_parameters() if p.requires_grad}
        results[layout] = loss.detach(), grads
    (loss_s, grads_s), (loss_m, grads_m) = results["standard"], results["merged_qkv"]
    assert torch.isfinite(loss_s) and loss_s > 0
    assert ((loss_m - loss_s).abs() / loss_s.abs()).item() <= 1e-5
    assert grads_s.keys() == grads_m.keys() and len(grads_s) >= 8
    for name, grad in grads_s.items():
        assert grad.abs().max() > 0, name
        assert ((grads_m[name] - grad).norm() / grad.norm()).item() <= 1e-5, name


def test_loss_reads_the_target_tokens_only(tiny_qwen21_path, conditioner):
    """The velocity comes from the last (target) tokens of the joint sequence: changing the target changes the
    loss, and the prediction has exactly the target's token count."""
    inputs = conditioner(_batch(references=1))
    step = EditLoss(FlowMatchObjective(scheduler_config=conditioner.scheduler_config))
    transformer = _transformer(tiny_qwen21_path, "merged_qkv")
    sigmas = torch.tensor([0.5])
    with torch.no_grad():
        velocity = step.predict_velocity(transformer, inputs.target, inputs, sigmas)
        full = transformer(
            hidden_states=torch.cat([inputs.condition, inputs.target], 1),
            timestep=sigmas,
            encoder_hidden_states=inputs.prompt_embeds,
            img_shapes=inputs.img_shapes,
            img_mask=torch.cat([inputs.image_slots, inputs.image_slots.new_ones(1, inputs.target.shape[1] // 4)], 1),
            return_dict=False,
        )[0]
    assert velocity.shape == inputs.target.shape
    torch.testing.assert_close(velocity, full[:, -inputs.target.shape[1] :])
