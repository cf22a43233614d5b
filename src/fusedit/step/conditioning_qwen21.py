"""Turn a data batch into Qwen-Image-2.1 transformer inputs, the way diffusers' `QwenImage21ModularPipeline` does.

The model-specific pieces are diffusers' own functions from `diffusers.modular_pipelines.qwenimage21`, called rather
than retyped: `get_qwenimage21_prompt_embeds` (Qwen3-VL, the 2.1 prompt template with one `<imageN>` slot per
reference image, the system prefix dropped, the last decoder layer before the final norm, and the mask of the
Qwen3-VL image slots), `encode_vae_image` (VAE mode + latents_mean/std normalisation) and `pack_latents` (2.1 takes
latents unpatched: a spatial flatten to [B, H/16 * W/16, 64]).

The layout differs from the MMDiT's (fusedit.step.conditioning): the reference images are seen twice, by Qwen3-VL as
vision tokens of the prompt and by the VAE as latent tokens that the transformer puts into those vision slots of the
text stream; the target's latent tokens come last (`hidden_states = [references..., target]`, `img_shapes` lists the
references first and the target last), and `img_mask` marks the image slots, one per 2x2 latent tokens, the target's
appended (the pipeline's `joint_vision_mask`). The transformer (`causal_condition=True`) modulates the text and
reference tokens from t = 0 itself; the loss reads the target tokens only (fusedit.step.loss).
"""

from __future__ import annotations

from itertools import repeat
from pathlib import Path

import PIL.Image
import torch
from torch import nn

from fusedit.step.conditioning import EditInputs, no_loading_progress_bars, pad_prompts
from fusedit.step.token_weights import mask_to_tokens

# Latent tokens per Qwen3-VL image slot: the transformer expands each slot into a 2x2 group (diffusers'
# `joint_vision_mask` in modular_pipelines/qwenimage21/denoise.py).
TOKENS_PER_SLOT = 4


def joint_vision_mask(image_pad_mask: torch.Tensor, num_target_tokens: int) -> torch.Tensor:
    """`img_mask` for the transformer: the prompt's image slots [B, L] bool, then one slot per 4 target tokens."""
    from diffusers.modular_pipelines.qwenimage21.denoise import joint_vision_mask as diffusers_joint_vision_mask

    return diffusers_joint_vision_mask(image_pad_mask, num_target_tokens)


def load_qwen21_components(path: str | Path, dtype: torch.dtype | None = None) -> dict:
    """VAE, Qwen3-VL text encoder, processor and scheduler config of the QwenImage21Pipeline folder at `path`
    (no transformer). Raises FileNotFoundError for a missing component folder."""
    from diffusers import AutoencoderKLQwenImage21, FlowMatchEulerDiscreteScheduler
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLProcessor

    path = Path(path)
    for name in ("vae", "text_encoder", "processor", "scheduler"):
        if not (path / name).is_dir():
            raise FileNotFoundError(f"model.path {path} has no {name}/ folder; training 2.1 needs the whole pipeline")
    kwargs = {} if dtype is None else {"torch_dtype": dtype}
    with no_loading_progress_bars():  # as for the other families (fusedit.step.conditioning)
        return {
            "vae": AutoencoderKLQwenImage21.from_pretrained(path / "vae", **kwargs),
            "text_encoder": Qwen3VLForConditionalGeneration.from_pretrained(path / "text_encoder", **kwargs),
            "processor": Qwen3VLProcessor.from_pretrained(path / "processor"),
            "scheduler_config": dict(FlowMatchEulerDiscreteScheduler.load_config(path / "scheduler")),
        }


def to_rgba(images: torch.Tensor) -> torch.Tensor:
    """[B, 3 or 4, H, W] in [-1, 1] -> [B, 4, H, W]: an opaque alpha (1.0), as the pipeline converts RGB to RGBA."""
    if images.shape[1] == 4:
        return images
    return torch.cat([images, images.new_ones(images.shape[0], 1, *images.shape[2:])], dim=1)


def to_pil(image: torch.Tensor) -> PIL.Image.Image:
    """[4, H, W] in [-1, 1] -> an RGBA PIL image (what the pipeline hands Qwen3-VL; it composites alpha on white)."""
    array = ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return PIL.Image.fromarray(array, mode="RGBA")


class Qwen21Conditioner(nn.Module):
    """Frozen VAE + Qwen3-VL of a Qwen-Image-2.1 pipeline; `forward(batch)` gives `EditInputs` with `img_mask`.

    A batch holds `image` (target [B, 3, H, W] in [-1, 1]), `edit_images` (0 or more reference slots, each
    [B, 3, H_i, W_i]) and `prompt` (B strings). Sides must be multiples of 32 (16x VAE, and each Qwen3-VL slot covers
    2x2 latent tokens)."""

    text_to_image = False  # 2.1 edits and generates: a batch may carry references or none

    def __init__(self, vae: nn.Module, text_encoder: nn.Module, processor, scheduler_config: dict):
        super().__init__()
        self.vae = vae
        self.text_encoder = text_encoder
        for module in (self.vae, self.text_encoder):
            module.requires_grad_(False)
            module.eval()
        self.processor = processor
        self._scheduler_config = scheduler_config

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None) -> Qwen21Conditioner:
        return cls(**load_qwen21_components(path, dtype))

    def train(self, mode: bool = True) -> Qwen21Conditioner:
        return super().train(False)  # the frozen encoders stay in eval mode whatever Lightning asks

    @property
    def scheduler_config(self) -> dict:
        return dict(self._scheduler_config)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """[B, 3 or 4, H, W] in [-1, 1] -> packed normalised latents [B, H/16 * W/16, 64] and its img_shapes entry."""
        from diffusers.modular_pipelines.qwenimage21.encoders import encode_vae_image
        from diffusers.modular_pipelines.qwenimage21.inputs import pack_latents

        height, width = images.shape[-2:]
        if height % 32 or width % 32:
            raise ValueError(f"image size {width}x{height} is not a multiple of 32 (VAE 16x, 2x2 tokens per slot)")
        parameter = next(self.vae.parameters())
        latents = encode_vae_image(
            to_rgba(images),
            self.vae,
            generator=None,
            device=parameter.device,
            dtype=parameter.dtype,
            latent_channels=self.vae.config.z_dim,
        )
        return pack_latents(latents), (1, latents.shape[-2], latents.shape[-1])

    @torch.no_grad()
    def encode_prompts(
        self, prompts: list[str], references: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(embeds [B, L, D], mask [B, L] or None, image slots [B, L] bool), one sample at a time (each prompt
        shows its own references), padded after each prompt as the pipeline pads."""
        from diffusers.modular_pipelines.qwenimage21.encoders import get_qwenimage21_prompt_embeds

        device = next(self.text_encoder.parameters()).device
        embeds, slots = [], []
        for index, prompt in enumerate(prompts):
            images = [to_pil(to_rgba(slot[index : index + 1])[0]) for slot in references] or None
            embed, _, slot_mask = get_qwenimage21_prompt_embeds(
                self.text_encoder, self.processor, prompt=[prompt], image=images, device=device
            )
            embeds.append(embed[0])
            slots.append(slot_mask[0])
        prompt_embeds, prompt_mask = pad_prompts(embeds)
        longest = prompt_embeds.shape[1]
        image_slots = torch.stack([torch.cat([s, s.new_zeros(longest - len(s))]) for s in slots]).bool()
        return prompt_embeds, prompt_mask, image_slots

    @torch.no_grad()
    def forward(self, batch: dict, drop_prompts: list[bool] | None = None) -> EditInputs:
        """`drop_prompts[i]`: sample i uses the empty prompt (caption dropout), with its references, as the
        pipeline encodes a negative prompt. A batch `mask` ([B, 1, H, W], 1 = learn) gives per-token loss weights:
        a 2.1 token is 16x16 pixels in row-major order, as for the MMDiT's packed tokens."""
        references = list(batch["edit_images"])
        target, target_shape = self.encode_image(batch["image"])
        conditions, shapes = [], []
        for slot in references:
            packed, shape = self.encode_image(slot)
            conditions.append(packed)
            shapes.append(shape)
        prompts = [("" if drop else prompt) for prompt, drop in zip(batch["prompt"], drop_prompts or repeat(False))]
        prompt_embeds, prompt_mask, image_slots = self.encode_prompts(prompts, references)
        expected = sum(packed.shape[1] for packed in conditions) // TOKENS_PER_SLOT
        found = image_slots.sum(dim=1)
        if not bool((found == expected).all()):
            raise ValueError(
                f"rows {batch.get('row')}: Qwen3-VL gave {found.tolist()} image slots for {expected} reference slots "
                "of 2x2 latent tokens (the processor's patch size and the VAE's must agree)"
            )
        return EditInputs(
            target=target,
            condition=torch.cat(conditions, dim=1) if conditions else target[:, :0],
            prompt_embeds=prompt_embeds,
            prompt_mask=prompt_mask,
            img_shapes=[[*shapes, target_shape]] * target.shape[0],
            image_slots=image_slots,
            token_weights=None if batch.get("mask") is None else mask_to_tokens(batch["mask"]).to(target.device),
        )
