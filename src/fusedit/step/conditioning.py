"""Turn a data batch into Qwen-Image(-Edit) transformer inputs, the way the diffusers pipelines do at inference.

Everything model-specific is the pipeline's own code, called rather than retyped: `encode_prompt` (Qwen2.5-VL with
the pipeline's prompt template, the edit image(s) shown to the VLM, template prefix dropped), `_encode_vae_image`
(VAE mode + latents_mean/std normalisation), `_pack_latents` (2x2 patches), `calculate_dimensions` and the
`image_processor` (the image sizes the VLM sees). The pipeline object is built from `model.path` without its
transformer; its VAE and text encoder stay frozen in eval mode and never hold gradients.

Text-to-image (Qwen-Image, Qwen-Image-2512: `QwenImagePipeline`) is the same with no edit image: the prompt goes
through that pipeline's own `encode_prompt` (its text-to-image template, no image in the prompt), there are no
edit-image tokens (`condition` has 0 tokens) and `img_shapes` holds the target only, as `QwenImagePipeline.__call__`
builds them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers import DiffusionPipeline, QwenImageEditPipeline, QwenImageEditPlusPipeline, QwenImagePipeline
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus
from torch import nn

from fusedit.step.token_weights import mask_to_tokens

EDIT_PIPELINES = (QwenImageEditPipeline, QwenImageEditPlusPipeline)
# The pipelines fusedit trains LoRAs for: text-to-image and the edit ones.
TRAINABLE_PIPELINES = (QwenImagePipeline, *EDIT_PIPELINES)
# Area of the image the VLM is shown in QwenImageEditPipeline.__call__ (its `calculate_dimensions(1024 * 1024, ...)`).
EDIT_VLM_AREA = 1024 * 1024


@dataclass
class EditInputs:
    """What the transformer needs for one batch, plus the clean target latents the objective noises."""

    target: torch.Tensor  # [B, target tokens, C*4] packed, normalised clean latents x0
    condition: torch.Tensor  # [B, edit tokens, C*4] packed edit-image latents (all, in order); 0 tokens for T2I
    prompt_embeds: torch.Tensor  # [B, text tokens, D]
    prompt_mask: torch.Tensor | None  # [B, text tokens], None when no prompt is padded
    img_shapes: list[list[tuple[int, int, int]]]  # per sample: target then each edit image (if any), latent patches
    # [B, target tokens] float32 loss weights from the rows' masks (fusedit.step.token_weights); None: no mask.
    token_weights: torch.Tensor | None = None
    # Qwen-Image-2.1 only (fusedit.step.conditioning_qwen21): [B, text tokens] bool, the Qwen3-VL image slots of the
    # prompt. Its presence selects 2.1's layout: references first, target last, img_shapes in that order.
    image_slots: torch.Tensor | None = None

    @property
    def tokens_per_sample(self) -> int:
        return self.target.shape[1] + self.condition.shape[1] + self.prompt_embeds.shape[1]


def pad_prompts(embeds: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-prompt embeddings [L_i, D] -> (batch [B, max L_i, D] padded with zeros after each prompt's last token,
    mask [B, max L_i] int64 1 = token, or None when every prompt has the same length), as the pipelines pad."""
    lengths = [len(embed) for embed in embeds]
    longest = max(lengths)
    batch = torch.stack([torch.cat([e, e.new_zeros(longest - len(e), e.shape[1])]) for e in embeds])
    if min(lengths) == longest:
        return batch, None
    device = batch.device
    return batch, torch.stack([torch.arange(longest, device=device) < length for length in lengths]).long()


def unpadded(prompt_embeds: torch.Tensor, prompt_mask: torch.Tensor | None, index: int) -> torch.Tensor:
    """Sample `index` of a padded batch (`pad_prompts`) without its padding: [L_index, D]."""
    length = prompt_embeds.shape[1] if prompt_mask is None else int(prompt_mask[index].sum())
    return prompt_embeds[index, :length]


def trim_prompt_padding(
    prompt_embeds: torch.Tensor, prompt_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cut the trailing padding every sample shares; return (embeds, mask or None when nothing is padded).

    Only *trailing* columns are cut: text RoPE positions are column indices, so removing a column in the middle
    would move every later token. For batch 1 with right padding this removes all padding and the mask. Exact:
    a padded key is masked out of every query, and the padded text queries feed nothing the loss reads.
    """
    if prompt_mask is None:
        return prompt_embeds, None
    if prompt_mask.shape != prompt_embeds.shape[:2]:
        raise ValueError(
            f"prompt mask shape {tuple(prompt_mask.shape)} does not match prompt embeddings {tuple(prompt_embeds.shape)}"
        )
    valid = prompt_mask.bool()
    if not valid.any(dim=1).all():
        empty = (~valid.any(dim=1)).nonzero().flatten().tolist()
        raise ValueError(f"prompt mask of batch item(s) {empty} is all padding; every prompt needs a token")
    columns = valid.any(dim=0)
    keep = int(columns.nonzero().max()) + 1
    prompt_embeds, valid = prompt_embeds[:, :keep], valid[:, :keep]
    if bool(valid.all()):
        return prompt_embeds, None
    return prompt_embeds, prompt_mask[:, :keep]


def vlm_size(width: int, height: int, multi_image: bool) -> tuple[int, int]:
    """(width, height) in pixels at which the edit pipeline shows Qwen2.5-VL an edit image of `width` x `height`.

    The pipelines' own `calculate_dimensions`: QwenImageEditPipeline keeps the aspect at about EDIT_VLM_AREA,
    QwenImageEditPlusPipeline (`multi_image`, 2509/2511) at about CONDITION_IMAGE_SIZE. The conditioner resizes to
    it; fusedit.data.prompt_length counts the vision tokens of that size.
    """
    if multi_image:
        area, module = pipeline_qwenimage_edit_plus.CONDITION_IMAGE_SIZE, pipeline_qwenimage_edit_plus
    else:
        area, module = EDIT_VLM_AREA, pipeline_qwenimage_edit
    dims = module.calculate_dimensions(area, width / height)
    return int(dims[0]), int(dims[1])


@contextlib.contextmanager
def no_loading_progress_bars() -> Iterator[None]:
    """diffusers' "Loading pipeline components..." and transformers' "Loading checkpoint shards" bars off for the
    loads inside, restored after. A training run (and `fusedit cache`) loads its encoders once, in seconds, before
    its own progress bar: the bars are noise there (on the tiny pipeline they were most of a run's output), and
    inference, which calls diffusers directly, keeps them."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    enabled = diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled[0]:
            diffusers_logging.enable_progress_bar()
        if enabled[1]:
            transformers_logging.enable_progress_bar()


def load_edit_pipeline(path: str | Path, dtype: torch.dtype | None = None) -> DiffusionPipeline:
    """The Qwen-Image(-Edit) pipeline at `path` without its transformer (VAE, text encoder, tokenizer, the edit
    pipelines' processor, scheduler). Raises FileNotFoundError without model_index.json, ValueError for a pipeline
    fusedit does not train (`TRAINABLE_PIPELINES`)."""
    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"model.path {path} is not a diffusers pipeline directory (no model_index.json); training needs the "
            "VAE and text encoder next to the transformer"
        )
    with no_loading_progress_bars():
        pipeline = DiffusionPipeline.from_pretrained(path, transformer=None, dtype=dtype)
    if not isinstance(pipeline, TRAINABLE_PIPELINES):
        raise ValueError(
            f"model.path {path} holds a {type(pipeline).__name__}; fusedit trains Qwen-Image pipelines "
            f"({', '.join(cls.__name__ for cls in TRAINABLE_PIPELINES)})"
        )
    return pipeline


def _encode_vae(pipeline: DiffusionPipeline, images: torch.Tensor) -> torch.Tensor:
    """[B, 3, 1, H, W] -> normalised latents [B, C, 1, H/8, W/8] by the edit pipelines' `_encode_vae_image`.

    QwenImagePipeline has no encoder method of its own (it only samples); the edit pipelines' one reads nothing
    but `vae` and `latent_channels`, so text-to-image runs the very same code on its VAE.
    """
    owner = SimpleNamespace(vae=pipeline.vae, latent_channels=pipeline.vae.config.z_dim)
    return QwenImageEditPipeline._encode_vae_image(owner, images, generator=None)


class EditConditioner(nn.Module):
    """Frozen VAE + text encoder of a Qwen-Image(-Edit) pipeline; `forward(batch)` gives `EditInputs`.

    With a text-to-image pipeline (`text_to_image`) a batch has no edit image and its inputs no edit tokens."""

    def __init__(self, pipeline: DiffusionPipeline):
        super().__init__()
        if not isinstance(pipeline, TRAINABLE_PIPELINES):
            raise TypeError(f"expected a Qwen-Image(-Edit) pipeline, got {type(pipeline).__name__}")
        self.vae = pipeline.vae
        self.text_encoder = pipeline.text_encoder
        for module in (self.vae, self.text_encoder):
            module.requires_grad_(False)
            module.eval()
        # Kept outside the module tree (a plain attribute): the pipeline is not an nn.Module, and its VAE and text
        # encoder are already registered above, so Lightning moves them and they appear once in module listings.
        object.__setattr__(self, "pipeline", pipeline)
        self.multi_image = isinstance(pipeline, QwenImageEditPlusPipeline)
        self.text_to_image = not isinstance(pipeline, EDIT_PIPELINES)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None) -> EditConditioner:
        return cls(load_edit_pipeline(path, dtype))

    def offload_text_encoder(self, device: torch.device) -> EditConditioner:
        """Keep the text encoder's weights in host memory and copy each layer to `device` just before it runs
        (diffusers' group offloading, leaf level, prefetching the next layer on a side CUDA stream); the VAE moves to
        `device` whole. For encoding on a GPU the text encoder does not fit (Qwen2.5-VL-7B: 16.6 GB in bf16): the GPU
        then holds about two of its largest layers (the 1.1 GB token embedding and LM head) plus activations.
        Inference only: the hooks overwrite the weights with their host copies after use, which is right for frozen
        encoders and wrong for anything trained (hence not used for the transformer: fusedit.model.streaming)."""
        from diffusers.hooks import apply_group_offloading

        device = torch.device(device)
        self.vae.to(device)
        apply_group_offloading(
            self.text_encoder,
            onload_device=device,
            offload_device=torch.device("cpu"),
            offload_type="leaf_level",
            use_stream=device.type == "cuda",
        )
        # Where encode_prompt must put its inputs: the parameters themselves report the CPU between uses.
        self.execution_device = device
        return self

    def train(self, mode: bool = True) -> EditConditioner:
        # Lightning calls .train() on the whole LightningModule each epoch; the frozen encoders stay in eval mode.
        return super().train(False)

    @property
    def scheduler_config(self) -> dict:
        return dict(self.pipeline.scheduler.config)

    # -- text --------------------------------------------------------------------------------------------------------
    def _vlm_images(self, edit_images: list[torch.Tensor], index: int) -> list:
        """The edit image(s) of sample `index` as the pipeline shows them to Qwen2.5-VL (PIL, resized as it does)."""
        processor = self.pipeline.image_processor
        images = []
        for slot in edit_images:
            image = processor.postprocess(slot[index : index + 1].float(), output_type="pil")[0]
            width, height = vlm_size(*image.size, multi_image=self.multi_image)
            images.append(processor.resize(image, height, width))
        return images

    @torch.no_grad()
    def encode_prompts(
        self, prompts: list[str], edit_images: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompt embeddings [B, L, D] and mask [B, L] (None when nothing is padded), one sample at a time.

        Per sample because Edit-2509's template numbers the pictures of one prompt; padding then matches the
        pipeline's own (zeros after each prompt's last token). Text-to-image: `edit_images` is empty and the prompt
        goes through QwenImagePipeline's template (which, like that pipeline, keeps at most 1024 tokens).
        """
        device = getattr(self, "execution_device", None) or next(self.text_encoder.parameters()).device
        embeds = []
        for index, prompt in enumerate(prompts):
            if self.text_to_image:
                embed, _ = self.pipeline.encode_prompt(prompt=[prompt], device=device)
                embeds.append(embed[0])
                continue
            images = self._vlm_images(edit_images, index)
            image = images if self.multi_image else images[0]
            embed, _ = self.pipeline.encode_prompt(prompt=[prompt], image=image, device=device)
            embeds.append(embed[0])
        return pad_prompts(embeds)

    # -- images ------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """[B, 3, H, W] in [-1, 1] -> packed normalised latents [B, H/16 * W/16, 64] and its img_shapes entry."""
        height, width = images.shape[-2:]
        multiple = self.pipeline.vae_scale_factor * 2
        if height % multiple or width % multiple:
            raise ValueError(f"image size {width}x{height} is not a multiple of {multiple} (VAE 8x + 2x2 packing)")
        vae_dtype = next(self.vae.parameters()).dtype
        latents = _encode_vae(self.pipeline, images.to(vae_dtype).unsqueeze(2))
        batch, channels, _, latent_h, latent_w = latents.shape
        packed = self.pipeline._pack_latents(latents, batch, channels, latent_h, latent_w)
        return packed, (1, latent_h // 2, latent_w // 2)

    @torch.no_grad()
    def forward(self, batch: dict, drop_prompts: list[bool] | None = None) -> EditInputs:
        """`drop_prompts[i]`: sample i uses the empty prompt (caption dropout), encoded through the same template
        with its edit image(s), as the pipelines encode a negative prompt."""
        edit_images = batch["edit_images"]
        if self.text_to_image:
            if edit_images:
                raise ValueError(
                    f"rows {batch.get('row')} have {len(edit_images)} edit image(s), but QwenImagePipeline "
                    "(text-to-image) takes none"
                )
        elif not edit_images:
            raise ValueError(f"batch (rows {batch.get('row')}) has no edit image; Qwen-Image-Edit needs at least one")
        if len(edit_images) > 1 and not self.multi_image:
            raise ValueError(
                f"rows {batch.get('row')} have {len(edit_images)} edit images, but QwenImageEditPipeline takes one; "
                "use a Qwen-Image-Edit-2509/2511 (QwenImageEditPlusPipeline) model for several"
            )
        target, target_shape = self.encode_image(batch["image"])
        conditions, shapes = [], [target_shape]
        for slot in edit_images:
            packed, shape = self.encode_image(slot)
            conditions.append(packed)
            shapes.append(shape)
        prompts = [("" if drop else prompt) for prompt, drop in zip(batch["prompt"], drop_prompts or repeat(False))]
        prompt_embeds, prompt_mask = self.encode_prompts(prompts, edit_images)
        mask = batch.get("mask")
        return EditInputs(
            target=target,
            condition=torch.cat(conditions, dim=1) if conditions else target[:, :0],
            prompt_embeds=prompt_embeds,
            prompt_mask=prompt_mask,
            img_shapes=[list(shapes)] * target.shape[0],
            token_weights=None if mask is None else mask_to_tokens(mask).to(target.device),
        )
