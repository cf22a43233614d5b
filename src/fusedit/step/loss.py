"""The loss of one training step, without Lightning: draw noise levels and noise, run the transformer, score it.

`EditLoss(objective, attention).loss(transformer, inputs, seed, rows)` is what `EditLoRAModule.training_step`
computes after conditioning, and what the benchmark (fusedit.bench) times, so a benchmark figure is the figure
of the trainer's step.

Randomness comes from generators seeded per sample by (seed, dataset row), not from the global RNG: a resumed run
draws exactly what an uninterrupted one would have, and a sample gets the same draw whichever rank or batch
position it lands on (2 ranks x batch 1 = 1 rank x batch 2).
"""

from __future__ import annotations

import random

import torch
from torch import nn

from fusedit.model.attention import ATTENTION_BACKENDS, attention_backend
from fusedit.step.conditioning import EditInputs, trim_prompt_padding
from fusedit.step.objective import FlowMatchObjective
from fusedit.step.token_weights import edit_difference_weights


def _generators(seed: int, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    cpu = torch.Generator().manual_seed(seed)
    on_device = torch.Generator(device=device).manual_seed(seed) if device.type != "cpu" else cpu
    return cpu, on_device


def sample_seeds(seed: int, rows) -> list[int]:
    """One seed per sample from its dataset row (and its repeat within the batch), independent of the rank."""
    seen: dict[int, int] = {}
    seeds = []
    for row in (int(r) for r in rows):
        seen[row] = seen.get(row, -1) + 1
        seeds.append((seed * 1_000_033 + row * 104_729 + seen[row] * 15_485_863 + 1) % (2**63))
    return seeds


class EditLoss:
    """The flow-matching loss of the transformer on one batch of `EditInputs`.

    attention: SDPA backend preference (fusedit.model.attention.ATTENTION_BACKENDS). trim_padding: cut the prompt
    padding every sample shares and drop an all-ones mask (exact; lets SDPA take its fused kernels); False passes
    the mask as given (the bench's `mask` modifier measures what that costs).
    """

    def __init__(self, objective: FlowMatchObjective, attention: str = "auto", trim_padding: bool = True):
        if attention not in ATTENTION_BACKENDS:
            raise ValueError(f"model.attention must be one of {ATTENTION_BACKENDS}, got {attention!r}")
        self.objective = objective
        self.attention = attention
        self.trim_padding = trim_padding

    def draw(self, x0: torch.Tensor, seed: int, rows=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigmas [B] float32, noise like x0) for clean latents x0 [B, tokens, C], all drawn from `seed`; with
        `rows` (dataset rows, one per sample) each sample draws from its own seed (`sample_seeds`)."""
        if rows is None:
            cpu_generator, device_generator = _generators(seed, x0.device)
            sigmas = self.objective.sample_sigmas(x0.shape[0], x0.shape[1], cpu_generator).to(x0.device)
            noise = torch.randn(x0.shape, generator=device_generator, device=x0.device, dtype=x0.dtype)
            return sigmas, noise
        draws = []
        for sample_seed in sample_seeds(seed, rows):
            cpu_generator, device_generator = _generators(sample_seed, x0.device)
            sigma = self.objective.sample_sigmas(1, x0.shape[1], cpu_generator)
            draws.append((sigma, torch.randn(x0.shape[1:], generator=device_generator, device=x0.device)))
        sigmas = torch.cat([sigma for sigma, _ in draws]).to(x0.device)
        return sigmas, torch.stack([sample for _, sample in draws]).to(x0.dtype)

    def predict_velocity(
        self, transformer: nn.Module, noisy: torch.Tensor, inputs: EditInputs, sigmas: torch.Tensor
    ) -> torch.Tensor:
        """Transformer velocity [B, target tokens, C] for the noisy target tokens; the edit-image tokens ride along
        as conditioning. The transformer gets the prompt embeddings' dtype; the attention backend chosen here also
        runs the backward."""
        dtype = inputs.prompt_embeds.dtype
        prompt_embeds, prompt_mask = inputs.prompt_embeds, inputs.prompt_mask
        if self.trim_padding:
            prompt_embeds, prompt_mask = trim_prompt_padding(prompt_embeds, prompt_mask)
        if inputs.image_slots is not None:
            return self._predict_qwen21(transformer, noisy.to(dtype), inputs, sigmas, prompt_embeds, prompt_mask)
        hidden = torch.cat([noisy.to(dtype), inputs.condition.to(dtype)], dim=1)
        with attention_backend(self.attention):
            output = transformer(
                hidden_states=hidden,
                timestep=sigmas.to(device=hidden.device, dtype=dtype),
                encoder_hidden_states=prompt_embeds,
                encoder_hidden_states_mask=prompt_mask,
                img_shapes=inputs.img_shapes,
                return_dict=False,
            )[0]
        return output[:, : noisy.shape[1]]

    def _predict_qwen21(self, transformer, noisy, inputs, sigmas, prompt_embeds, prompt_mask) -> torch.Tensor:
        """Qwen-Image-2.1, as QwenImage21ModularPipeline's denoiser calls it: [references, target] tokens, the
        prompt's image slots plus one per 4 target tokens as `img_mask`, the target's output tokens (the last)."""
        from fusedit.step.conditioning_qwen21 import joint_vision_mask

        hidden = torch.cat([inputs.condition.to(noisy.dtype), noisy], dim=1)
        image_slots = inputs.image_slots[:, : prompt_embeds.shape[1]]  # trimming cuts trailing padding only
        with attention_backend(self.attention):
            output = transformer(
                hidden_states=hidden,
                timestep=sigmas.to(device=hidden.device, dtype=noisy.dtype),
                encoder_hidden_states=prompt_embeds,
                encoder_hidden_states_mask=None if prompt_mask is None else prompt_mask.bool(),
                img_shapes=inputs.img_shapes,
                img_mask=joint_vision_mask(image_slots, noisy.shape[1]),
                return_dict=False,
            )[0]
        return output[:, -noisy.shape[1] :]

    def loss(
        self, transformer: nn.Module, inputs: EditInputs, seed: int, rows=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss: float32 scalar, sigmas [B]) for one batch with all randomness drawn from `seed` (per sample with
        `rows`). Noising and the target in float32; the transformer runs in its own dtype."""
        x0 = inputs.target.float()
        sigmas, noise = self.draw(x0, seed, rows)
        prediction = self.predict_velocity(transformer, self.objective.noisy(x0, noise, sigmas), inputs, sigmas)
        target = self.objective.target(x0, noise)
        return self.objective.loss(prediction, target, sigmas, self.token_weights(inputs)), sigmas

    def token_weights(self, inputs: EditInputs) -> torch.Tensor | None:
        """[B, target tokens] loss weights: the batch's mask (`inputs.token_weights`) times, with
        `objective.mask_from_edit`, the soft mask of the (target, edit image) pair; None when neither is on."""
        weights = inputs.token_weights
        if self.objective.mask_from_edit:
            if inputs.condition.shape[1] == 0:
                raise ValueError("objective.mask_from_edit needs an edit image; text-to-image rows have none")
            # Qwen-Image-2.1 (image_slots set) lists the references first and the target last in img_shapes.
            soft = edit_difference_weights(
                inputs.target,
                inputs.condition,
                inputs.img_shapes,
                self.objective.mask_from_edit_floor,
                target_last=inputs.image_slots is not None,
            )
            weights = soft if weights is None else weights.to(soft.device, soft.dtype) * soft
        return weights


def dropped_captions(seed: int, rows, probability: float) -> list[bool]:
    """Per sample: whether it trains on the empty prompt (`data.caption_dropout` = `probability`).

    Drawn from (`seed`, dataset row) alone, as the noise is (`sample_seeds`; the trainer's seed already holds the
    step), but from its own stream: turning dropout on does not change any noise draw."""
    if probability <= 0.0:
        return [False] * len(rows)
    return [random.Random(f"caption-dropout/{seed}").random() < probability for seed in sample_seeds(seed, rows)]
