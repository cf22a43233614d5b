"""Masked loss: a mask (mask column, data.mask_dir) or objective.mask_from_edit weights the target tokens; the loss
is the masked mean, so masked tokens get exactly no gradient and the rest the unmasked one up to normalisation."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from diffusers import QwenImageEditPipeline
from PIL import Image

from fusedit.cache import CachedConditioner, CachedEditDataModule
from fusedit.data import DataValidationError, EditDataModule, make_sample_dataset
from fusedit.step.build import build_transformer
from fusedit.step.conditioning import EditConditioner, EditInputs
from fusedit.step.config import LoraSpec, ModelConfig
from fusedit.step.loss import EditLoss
from fusedit.step.objective import FlowMatchObjective
from fusedit.step.precision import Precision
from fusedit.step.token_weights import edit_difference_weights, mask_to_tokens
from fusedit.training.module import EditLoRAModule
from tests.data_helpers import save_image, write_csv
from tests.test_data_sources import pairs


def prediction_gradient(token_weights, seed=0):
    """(loss, d loss / d prediction) for random prediction/target [2, 12, 8] and the given weights."""
    generator = torch.Generator().manual_seed(seed)
    prediction = torch.randn(2, 12, 8, generator=generator, requires_grad=True)
    target = torch.randn(2, 12, 8, generator=generator)
    loss = FlowMatchObjective(weighting="none").loss(prediction, target, torch.full((2,), 0.5), token_weights)
    loss.backward()
    return loss, prediction.grad


def test_masked_tokens_get_no_gradient_and_the_rest_the_unmasked_one():
    weights = torch.ones(2, 12)
    weights[0, :5] = 0
    weights[1, 7:] = 0
    _, unmasked = prediction_gradient(None)
    _, masked = prediction_gradient(weights)
    assert torch.all(masked[weights == 0] == 0)  # exactly zero
    # Elsewhere: the unmasked gradient, renormalised from all 12 tokens to the sample's 7 or 7 kept ones.
    scale = (12 / weights.sum(1)).view(2, 1, 1)
    kept = weights.bool()
    torch.testing.assert_close(masked[kept], (unmasked * scale)[kept], rtol=1e-6, atol=0)


def test_an_all_white_mask_is_the_unmasked_loss():
    loss, grad = prediction_gradient(None)
    white_loss, white_grad = prediction_gradient(torch.ones(2, 12))
    torch.testing.assert_close(white_loss, loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(white_grad, grad, rtol=1e-6, atol=0)


def test_mask_tokens_follow_the_latent_packing():
    """One white 16x16 block at block (row 1, column 2) of a 64x48 (WxH) mask is the token `_pack_latents` puts
    the latent 2x2 patch (1, 2) at."""
    mask = torch.zeros(1, 1, 48, 64)
    mask[..., 16:32, 32:48] = 1
    mask[..., 0, 0] = 1  # one pixel of token 0: weight 1/256 (the mean of the token's pixels)
    tokens = mask_to_tokens(mask)
    latents = torch.zeros(1, 1, 6, 8)  # the VAE grid of a 64x48 image: 8 pixels a latent
    latents[..., 2:4, 4:6] = 1  # latent 2x2 patch (1, 2)
    packed = QwenImageEditPipeline._pack_latents(latents, 1, 1, 6, 8)  # [1, 12 tokens, 4]
    assert tokens.shape == (1, 12)
    assert tokens[0].nonzero().flatten().tolist() == [0, packed[0].sum(-1).nonzero().item()]
    assert tokens[0, 0].item() == pytest.approx(1 / 256)


def test_mask_from_edit_weighs_tokens_by_how_much_they_change():
    target = torch.zeros(1, 4, 3)
    edit = target.clone()
    edit[0, 2] = 2.0  # token 2 changes most, token 1 half as much
    edit[0, 1] = 1.0
    shapes = [[(1, 2, 2), (1, 2, 2)]]
    weights = edit_difference_weights(target, edit, shapes, floor=0.1)
    torch.testing.assert_close(weights, torch.tensor([[0.1, 0.55, 1.0, 0.1]]))
    # An edit image of another size is resampled to the target's token grid first.
    assert edit_difference_weights(torch.zeros(1, 16, 3), edit, [[(1, 4, 4), (1, 2, 2)]]).shape == (1, 16)


def test_mask_from_edit_changes_the_loss_gradient_only_by_the_token_weights(tiny_edit_path):
    """Through the trainer's loss: the gradient per token with mask_from_edit is the plain one times w_t, up to the
    per-sample normalisation."""
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(1, 4, 64, generator=generator)
    condition = target.clone()
    condition[0, 3] += 1.0  # only token 3 differs
    inputs = EditInputs(target, condition, torch.randn(1, 5, 16), None, [[(1, 2, 2), (1, 2, 2)]])
    plain, soft = FlowMatchObjective(weighting="none"), FlowMatchObjective(weighting="none", mask_from_edit=True)
    weights = EditLoss(soft).token_weights(inputs)
    torch.testing.assert_close(weights, torch.tensor([[0.1, 0.1, 0.1, 1.0]]))
    prediction = torch.randn(1, 4, 64, generator=generator)
    grads = []
    for objective in (plain, soft):
        leaf = prediction.clone().requires_grad_()
        objective.loss(leaf, target, torch.tensor([0.5]), EditLoss(objective).token_weights(inputs)).backward()
        grads.append(leaf.grad)
    ratio = (grads[1] / grads[0]).mean(-1)  # per token
    torch.testing.assert_close(ratio, weights * 4 / weights.sum(), rtol=1e-5, atol=0)


# -- masks from the data ----------------------------------------------------------------------------------------------
def masked_csv(root, mask_for=lambda index: "left"):
    """The sample dataset (4 rows, 32x32) with a mask column: left half black, or all white ("white")."""
    metadata = make_sample_dataset(root, n=4, size=32)
    lines = metadata.read_text().splitlines()
    out = [lines[0] + ",mask"]
    for index, line in enumerate(lines[1:]):
        pixels = np.full((32, 32), 255, np.uint8)
        if mask_for(index) == "left":
            pixels[:, :16] = 0
        Image.fromarray(pixels).save(root / f"mask_{index}.png")
        out.append(f"{line},mask_{index}.png")
    metadata.write_text("\n".join(out) + "\n")
    return metadata


def test_a_mask_is_resized_with_its_target_and_reaches_the_tokens(tmp_path, tiny_edit_path):
    data = EditDataModule(masked_csv(tmp_path), shuffle=False, batch_size=2)
    data.setup()
    batch = next(iter(data.train_dataloader()))
    assert batch["mask"].shape == (2, 1, 32, 32)
    inputs = EditConditioner.from_pretrained(tiny_edit_path)(batch)
    assert inputs.token_weights.shape == inputs.target.shape[:2] == (2, 4)
    torch.testing.assert_close(inputs.token_weights, torch.tensor([[0.0, 1.0, 0.0, 1.0]] * 2))


def test_a_mask_of_another_size_is_refused_naming_the_row(tmp_path):
    metadata = masked_csv(tmp_path)
    save_image(tmp_path / "mask_2.png", (16, 16))
    with pytest.raises(DataValidationError, match=r"row 4, column 'mask', path 'mask_2.png': mask is 16x16, the image"):
        EditDataModule(metadata).setup()


def test_an_all_black_mask_is_refused_naming_the_row_and_file(tmp_path):
    """An all-black mask weights every token 0: the row would train on a loss of exactly 0. Refused at validation
    (before any model loads), for a mask column and for data.mask_dir alike; a mask with one grey pixel is kept."""
    metadata = masked_csv(tmp_path)
    save_image(tmp_path / "mask_1.png", (32, 32), (0, 0, 0))
    pixels = np.zeros((32, 32), np.uint8)
    pixels[5, 5] = 1
    Image.fromarray(pixels).save(tmp_path / "mask_3.png")  # all but black: trains that token a little
    with pytest.raises(
        DataValidationError, match=r"row 3, column 'mask', path 'mask_1.png': mask is all black"
    ) as caught:
        EditDataModule(metadata).setup()
    assert "row 5" not in str(caught.value) and "1 of 4 rows are bad" in str(caught.value)

    pairs(tmp_path / "folder")
    save_image(tmp_path / "folder" / "masks" / "s1.png", (32, 48), (0, 0, 0))
    folder = EditDataModule(
        format="folder",
        image_dir=tmp_path / "folder" / "targets",
        control_dirs=[tmp_path / "folder" / "controls"],
        mask_dir=tmp_path / "folder" / "masks",
    )
    with pytest.raises(DataValidationError, match=r"s1.png.*: mask is all black"):
        folder.setup()


def test_mask_dir_matches_targets_by_stem(tmp_path):
    pairs(tmp_path)
    save_image(tmp_path / "masks" / "s1.png", (32, 48), (255, 255, 255))
    data = EditDataModule(
        format="folder",
        image_dir=tmp_path / "targets",
        control_dirs=[tmp_path / "controls"],
        mask_dir=tmp_path / "masks",
    )
    data.setup()
    masks = {sample.image.name: sample.mask for sample in data.train_dataset.samples}
    assert masks == {"s0.png": None, "s1.png": tmp_path / "masks" / "s1.png", "s2.png": None}


@pytest.mark.parametrize("mask", ["left", "white"])
def test_masked_loss_is_the_same_from_the_cache_and_white_equals_no_mask(tmp_path, tiny_edit_path, mask):
    metadata = masked_csv(tmp_path / "data", lambda index: mask if index % 2 else "none")
    live_data = EditDataModule(metadata, batch_size=2, shuffle=False)
    live_data.setup()
    cached_data = CachedEditDataModule(
        cache_dir=tmp_path / "cache", model_path=tiny_edit_path, metadata=metadata, batch_size=2, shuffle=False
    )
    cached_data.setup()
    torch.manual_seed(0)
    transformer = build_transformer(tiny_edit_path, ModelConfig(), LoraSpec("attn", rank=4, alpha=8), Precision())
    optimizer = functools.partial(torch.optim.AdamW, lr=1e-3)
    live = EditLoRAModule(transformer, EditConditioner.from_pretrained(tiny_edit_path), FlowMatchObjective(), optimizer)
    cached = EditLoRAModule(transformer, CachedConditioner(tiny_edit_path), FlowMatchObjective(), optimizer)
    for live_batch, cached_batch in zip(live_data.train_dataloader(), cached_data.train_dataloader(), strict=True):
        live_inputs, cached_inputs = live.conditioner(live_batch), cached.conditioner(cached_batch)
        torch.testing.assert_close(cached_inputs.token_weights, live_inputs.token_weights)
        live_loss = live.compute_loss(live_inputs, seed=7)[0]
        assert cached.compute_loss(cached_inputs, seed=7)[0].item() == pytest.approx(live_loss.item(), rel=1e-5)
        unmasked = live.compute_loss(EditInputs(**{**vars(live_inputs), "token_weights": None}), seed=7)[0]
        if mask == "white":
            assert live_loss.item() == pytest.approx(unmasked.item(), rel=1e-6)
        else:
            assert live_loss.item() != pytest.approx(unmasked.item(), rel=1e-6)


def test_an_empty_mask_cell_trains_every_pixel(tmp_path):
    pairs(tmp_path)
    save_image(tmp_path / "m.png", (48, 32))
    rows = [[f"targets/s{i}.png", f"controls/s{i}.jpg", f"p{i}", "m.png" if i == 0 else ""] for i in range(3)]
    metadata = write_csv(tmp_path / "masked.csv", rows, header=("image", "edit_image", "prompt", "mask"))
    data = EditDataModule(metadata)
    data.setup()
    assert [sample.mask is not None for sample in data.train_dataset.samples] == [True, False, False]


def test_mask_from_edit_on_a_text_to_image_model_is_refused_before_loading(tiny_t2i_path):
    from fusedit.training.validate_config import validate_train_config
    from tests.training_utils import compose_train

    cfg = compose_train([f"model.path={tiny_t2i_path}", "objective.mask_from_edit=true"])
    with pytest.raises(Exception, match="objective.mask_from_edit=true .* model.path is Qwen-Image"):
        validate_train_config(cfg)
