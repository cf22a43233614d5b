"""Per-token loss weights: a user's mask reduced to the latent tokens, and the soft mask `objective.mask_from_edit`
computes from the (target, edit image) pair. docs/data.md#masked-loss.

A target token is one 2x2 patch of VAE latents, i.e. `PIXELS_PER_TOKEN` x `PIXELS_PER_TOKEN` pixels (VAE factor 8
x 2x2 patchify), numbered row by row as `QwenImageEditPipeline._pack_latents` orders them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PIXELS_PER_TOKEN = 16


def mask_to_tokens(mask: torch.Tensor) -> torch.Tensor:
    """Pixel mask [B, 1, H, W] in [0, 1] (1 = learn) -> token weights [B, H/16 * W/16] float32: the mean of each
    token's 16x16 pixels (avg-pool to the latent grid, then the 2x2 patchify), in packed-token order."""
    height, width = mask.shape[-2:]
    if height % PIXELS_PER_TOKEN or width % PIXELS_PER_TOKEN:
        raise ValueError(f"mask size {width}x{height} is not a multiple of {PIXELS_PER_TOKEN} (the target's own size)")
    return F.avg_pool2d(mask.float(), PIXELS_PER_TOKEN).flatten(1)


def edit_difference_weights(
    target: torch.Tensor, condition: torch.Tensor, img_shapes: list, floor: float = 0.1, target_last: bool = False
) -> torch.Tensor:
    """Soft mask [B, target tokens] float32 from how much each target token differs from the first edit image:

        d_t = mean_c |x0_t,c - e_t,c|        w_t = floor + (1 - floor) * d_t / max_t d_t      (per sample)

    x0: packed clean target latents [B, T, C]; e: the first edit image's packed latents, resampled (bilinear, on
    the token grid) to the target's grid when its size differs. The most changed token weighs 1, an unchanged one
    `floor` (so the rest of the image is still held in place).

    `img_shapes[0]` lists the target first, then the edit images (the MMDiT), or with `target_last` the edit images
    first and the target last (Qwen-Image-2.1, whose tokens are 16x16 pixels in row-major order too); `condition`
    holds the edit images' tokens in that order, so the first edit image's come first either way.
    """
    shapes = img_shapes[0]
    _, height, width = shapes[-1] if target_last else shapes[0]
    _, edit_height, edit_width = shapes[0] if target_last else shapes[1]
    edit = condition[:, : edit_height * edit_width].float()
    if (edit_height, edit_width) != (height, width):
        grid = edit.transpose(1, 2).reshape(edit.shape[0], edit.shape[2], edit_height, edit_width)
        grid = F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)
        edit = grid.flatten(2).transpose(1, 2)
    difference = (target.float() - edit).abs().mean(-1)
    scaled = difference / difference.amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return floor + (1.0 - floor) * scaled
