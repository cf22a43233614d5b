"""Sample Qwen-Image-2.1 images with diffusers' `QwenImage21ModularPipeline`, fusedit's transformer inside.

diffusers runs 2.1 through a modular pipeline (`QwenImage21AutoBlocks`: the Qwen3-VL prompt encoder, the VAE
encoder of the reference images, the block-causal denoise loop with its KV cache, the decoder), not through a
`DiffusionPipeline.__call__` like the MMDiT's. Everything here is that pipeline; fusedit only plugs its transformer
in (merged or standard layout, with or without LoRA adapters) and fixes the few calling conventions in one place:

- `pipeline_from_folder(path, transformer, dtype)`: `infer.py`'s pipeline: every component except the transformer
  from the folder (`ModularPipeline.from_pretrained` + `load_components`), fusedit's transformer put in.
- `pipeline_from_components(transformer, vae, text_encoder, processor, scheduler)`: the same pipeline around
  modules already in memory (training's validation images: the trained transformer and the conditioner's VAE and
  Qwen3-VL, nothing loaded twice).
- `sample(pipe, prompt, references, ...)`: one image, the one function both call.
- `encoded_pipeline(transformer, vae, scheduler)` and `sample_encoded(pipe, prompt_embeds, image_slots,
  references, ...)`: the same pipeline's denoise and decode blocks for a prompt and references already encoded
  (training's validation images from the latent cache: no Qwen3-VL, no VAE encoder); `decode(vae, latents)` its
  decode block alone (to show cached references and targets).

Guidance: 2.1 is sampled without classifier-free guidance (diffusers' `QwenImage21Pipeline` defaults
`true_cfg_scale` to 1.0: "Qwen-Image 2.1 is meant to be sampled without guidance"). A scale above 1 installs
diffusers' `ClassifierFreeGuidance` with it, and the negative prompt is then encoded with the same references.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import PIL.Image
import torch
from torch import nn


class _DropMessages(logging.Filter):
    """Drops records whose message starts with one of `prefixes` (diffusers' own notices that a user cannot act on)."""

    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


# Every 2.1 run builds diffusers' guider and components this way, so each run and each validation round printed these
# warnings about diffusers' own API ("Guiders are currently an experimental feature ...", "Component was not created
# using `ComponentSpec` ..."); nothing in them is the user's to change. Only these two messages are dropped.
logging.getLogger("diffusers.guiders.guider_utils").addFilter(_DropMessages("Guiders are currently an experimental"))
logging.getLogger("diffusers.modular_pipelines.modular_pipeline_utils").addFilter(
    _DropMessages("Component was not created using `ComponentSpec`")
)

# The pipeline's own default side (QwenImage21ModularPipeline's `output_resolution`): references are resized to
# about this side squared in their aspect, and the output takes the last reference's aspect (or is square).
DEFAULT_OUTPUT_RESOLUTION = 1024


def _guider(guidance_scale: float):
    from diffusers import ClassifierFreeGuidance

    return ClassifierFreeGuidance(guidance_scale=float(guidance_scale))


def pipeline_from_folder(path: str | os.PathLike, transformer: nn.Module, dtype: torch.dtype):
    """`QwenImage21ModularPipeline` of the pipeline folder `path` with `transformer` (fusedit's, any layout).

    The folder's VAE, Qwen3-VL text encoder, processor and scheduler are loaded in `dtype` (the transformer is
    never loaded from the folder: `transformer` replaces it). Raises ValueError when `path` is not a 2.1 folder.
    """
    from diffusers import ModularPipeline, QwenImage21ModularPipeline

    pipe = ModularPipeline.from_pretrained(str(path))  # a str: diffusers' loader ignores a pathlib.Path's components
    if not isinstance(pipe, QwenImage21ModularPipeline):
        raise ValueError(f"{path} loads as {type(pipe).__name__}, not QwenImage21ModularPipeline")
    names = [
        name
        for name, spec in pipe._component_specs.items()
        if name != "transformer" and spec.default_creation_method == "from_pretrained"
    ]
    pipe.load_components(names=names, dtype=dtype)
    pipe.update_components(transformer=transformer)
    return pipe


def pipeline_from_components(transformer: nn.Module, vae: nn.Module, text_encoder: nn.Module, processor, scheduler):
    """`QwenImage21ModularPipeline` around modules in memory (shared, not copied): diffusers' `QwenImage21AutoBlocks`
    with `scheduler` (a FlowMatchEulerDiscreteScheduler) and the default guider and image processor."""
    from diffusers.modular_pipelines import QwenImage21AutoBlocks

    pipe = QwenImage21AutoBlocks().init_pipeline()
    pipe.update_components(
        transformer=transformer, vae=vae, text_encoder=text_encoder, processor=processor, scheduler=scheduler
    )
    return pipe


@torch.no_grad()
def sample(
    pipe,
    prompt: str,
    references: Sequence[PIL.Image.Image] = (),
    *,
    num_inference_steps: int,
    seed: int,
    guidance_scale: float = 1.0,
    negative_prompt: str | None = None,
    height: int | None = None,
    width: int | None = None,
    output_resolution: int | None = None,
    output_type: str = "pil",
):
    """One image from `prompt` and 0 or more `references` (PIL, RGB or RGBA) with the 2.1 modular pipeline `pipe`.

    `height` / `width` (pixels, rounded down to multiples of 32 by diffusers) default to the last reference's aspect
    at `output_resolution` squared pixels, or `output_resolution` square without references;
    `output_resolution` defaults to diffusers' 1024. The noise comes from a CPU generator seeded with `seed`, so
    the image does not depend on the device. `guidance_scale` > 1 runs classifier-free guidance against
    `negative_prompt` (diffusers encodes "" for None). Returns an RGBA PIL image (2.1's VAE decodes alpha), or
    with `output_type="pt"` a float tensor [4, H, W] in [0, 1].
    """
    guidance_scale = float(guidance_scale)
    if guidance_scale != float(pipe.guider.guidance_scale):
        pipe.update_components(guider=_guider(guidance_scale))
    kwargs = {
        "prompt": prompt,
        "num_inference_steps": int(num_inference_steps),
        "output_resolution": int(output_resolution or DEFAULT_OUTPUT_RESOLUTION),
        "generator": torch.Generator("cpu").manual_seed(int(seed)),
        "output_type": output_type,
    }
    if references:
        kwargs["image"] = list(references)
    if height:
        kwargs["height"] = int(height)
    if width:
        kwargs["width"] = int(width)
    if guidance_scale > 1 and negative_prompt is not None:  # without guidance diffusers warns that it ignores it
        kwargs["negative_prompt"] = negative_prompt
    return pipe(**kwargs, output="images")[0]  # one prompt, one image


def encoded_pipeline(transformer: nn.Module, vae: nn.Module, scheduler):
    """`QwenImage21ModularPipeline` of diffusers' `QwenImage21AutoBlocks` without its text-encoder and VAE-encoder
    blocks: it takes `prompt_embeds`, `image_pad_mask` and `image_latents` as inputs (what those blocks would give)
    and runs the same denoise loop and decoder. `vae` needs only its decoder."""
    from diffusers.modular_pipelines import QwenImage21AutoBlocks

    blocks = QwenImage21AutoBlocks()
    for name in ("text_encoder", "vae_encoder"):
        blocks.sub_blocks.pop(name)
    pipe = blocks.init_pipeline()
    pipe.update_components(transformer=transformer, vae=vae, scheduler=scheduler)
    return pipe


def unpack(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Packed latents [B, h*w, C] of a (1, h, w) token grid -> [B, C, 1, h, w], the inverse of diffusers' 2.1
    `pack_latents` (a spatial flatten: 2.1 takes latents unpatched)."""
    return packed.transpose(1, 2).reshape(packed.shape[0], packed.shape[2], 1, height, width)


@torch.no_grad()
def sample_encoded(
    pipe,
    prompt_embeds: torch.Tensor,
    image_slots: torch.Tensor,
    references: Sequence[torch.Tensor] = (),
    *,
    height: int,
    width: int,
    num_inference_steps: int,
    seed: int,
    output_type: str = "pil",
):
    """One image from an encoded prompt with the `encoded_pipeline` `pipe`, as `sample` gives it from the prompt's
    text and reference images of the same size (tests/test_qwen21_validation.py: equal images).

    prompt_embeds: [1, L, D] (one unpadded prompt); image_slots: [1, L] bool, its Qwen3-VL image slots;
    references: each reference's normalised latents [1, C, 1, h, w] (`unpack` of the packed cache rows), in prompt
    order; height / width: the output in pixels. Noise from a CPU generator seeded with `seed`, as in `sample`.
    Returns an RGBA PIL image (or what `output_type` asks)."""
    kwargs = {
        "prompt_embeds": prompt_embeds,
        # diffusers' text-inputs step repeats the mask per image and drops it when nothing is padded: one prompt.
        "prompt_embeds_mask": torch.ones(prompt_embeds.shape[:2], dtype=torch.long, device=prompt_embeds.device),
        "image_pad_mask": image_slots.bool(),
        "height": int(height),
        "width": int(width),
        "num_inference_steps": int(num_inference_steps),
        "generator": torch.Generator("cpu").manual_seed(int(seed)),
        "output_type": output_type,
    }
    if references:
        kwargs["image_latents"] = list(references)
    return pipe(**kwargs, output="images")[0]


@torch.no_grad()
def decode(vae: nn.Module, latents: torch.Tensor) -> list[PIL.Image.Image]:
    """Normalised latents [B, C, 1, h, w] -> RGBA PIL images, by diffusers' 2.1 decode block (latents_mean/std,
    the VAE decoder, postprocessing), as the pipeline decodes its output."""
    from diffusers.modular_pipelines.qwenimage21.decoders import QwenImage21DecodeStep

    decoder = QwenImage21DecodeStep().init_pipeline()
    decoder.update_components(vae=vae)
    return decoder(latents=latents, output_type="pil", output="images")


def set_progress_bar_config(pipe, **kwargs) -> None:
    """`tqdm` options (`desc=...`, `disable=True`) for every block of a 2.1 modular pipeline, the denoise loop's
    included: `ModularPipeline.set_progress_bar_config` reaches only its top-level blocks; the loop sits deeper."""
    pending = list(pipe._blocks.sub_blocks.values())  # `pipe.blocks` is a copy; diffusers' own method reads _blocks
    while pending:
        block = pending.pop()
        if hasattr(block, "set_progress_bar_config"):
            block.set_progress_bar_config(**kwargs)
        pending += list(getattr(block, "sub_blocks", {}).values())


def disable_progress_bars(pipe) -> None:
    """Turn off the denoise loop's tqdm bar of a 2.1 modular pipeline (training's validation rounds print none)."""
    set_progress_bar_config(pipe, disable=True)
