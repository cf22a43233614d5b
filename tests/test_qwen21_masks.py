"""Masked loss for Qwen-Image-2.1: a row's mask and `objective.mask_from_edit` weigh the target tokens, which 2.1
appends after the references (the edit image is reference 0)."""

import torch

from fusedit.step.conditioning import EditInputs
from fusedit.step.loss import EditLoss
from fusedit.step.objective import FlowMatchObjective
from tests.test_qwen21_step import _batch, _transformer, conditioner  # noqa: F401 - the module fixture


def test_mask_from_edit_compares_the_target_with_reference_0():
    """img_shapes lists the references first and the target last; the soft mask reads the target's grid and the
    first reference's tokens (resampled to the target's grid when its size differs)."""
    generator = torch.Generator().manual_seed(0)
    edit = torch.randn(1, 2 * 3, 8, generator=generator)
    target = edit.clone()
    target[0, 4] += 5.0  # one changed token
    other_reference = torch.randn(1, 4, 8, generator=generator)  # never compared
    inputs = EditInputs(
        target=target,
        condition=torch.cat([edit, other_reference], dim=1),
        prompt_embeds=torch.zeros(1, 3, 4),
        prompt_mask=None,
        img_shapes=[[(1, 2, 3), (1, 2, 2), (1, 2, 3)]],
        image_slots=torch.zeros(1, 3, dtype=torch.bool),
    )
    step = EditLoss(FlowMatchObjective(mask_from_edit=True, mask_from_edit_floor=0.25))
    expected = torch.full((1, 6), 0.25)
    expected[0, 4] = 1.0
    torch.testing.assert_close(step.token_weights(inputs), expected)


def test_masked_target_tokens_get_zero_gradient(tiny_qwen21_path, conditioner):  # noqa: F811
    """A row's mask (left half 0) times the edit soft mask: the loss has zero gradient on the velocity of every
    masked target token, and a non-zero one on the others."""
    batch = _batch(references=2)
    mask = torch.ones(1, 1, 64, 96)
    mask[..., :48] = 0.0  # the left three of six token columns
    inputs = conditioner(batch | {"mask": mask})
    step = EditLoss(FlowMatchObjective(scheduler_config=conditioner.scheduler_config, mask_from_edit=True))
    transformer = _transformer(tiny_qwen21_path, "merged_qkv")
    predictions = []
    predict = step.predict_velocity

    def keep_prediction(*args, **kwargs):
        prediction = predict(*args, **kwargs)
        prediction.retain_grad()
        predictions.append(prediction)
        return prediction

    step.predict_velocity = keep_prediction
    loss, _ = step.loss(transformer, inputs, seed=3, rows=[3])
    loss.backward()
    grad = predictions[0].grad.abs().amax(-1).reshape(4, 6)  # target grid: 4 x 6 tokens
    assert torch.all(grad[:, :3] == 0) and torch.all(grad[:, 3:] > 0)
