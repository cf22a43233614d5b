"""Validation images in cached runs: generated from the cache, decoded by the VAE decoder alone.

The rows a validation round shows are rows of the cached dataset, so their prompt embeddings and edit-image
latents are in the cache already: generating needs neither the text encoder nor the VAE encoder, only the
transformer being trained and, to turn latents into pixels, the VAE decoder. That choice keeps training memory
where the cache put it:

- the 7B text encoder (about 16 GB in bf16) is never loaded, not even for a round — loading it lazily would
  put it next to the transformer and optimizer state at every round and re-read it from disk each time;
- the VAE decoder (73 M parameters, 0.15 GB in bf16; the encoder's 54 M are dropped) is read from disk at the
  first round and kept in CPU memory between rounds; it sits on the accelerator only while a round decodes, and
  the decode's activations (several GB at 1024²) are released with the cache allocator when the round ends.

Generation is the pipeline's sampling (`QwenImageEdit(Plus)Pipeline.__call__`: the same sigmas, shift, scheduler
and initial noise for a seed, via diffusers' own helpers), with the model call of the training step
(`EditLoRAModule.predict_velocity`) and the conditioning the training step sees: the cached latents at the
training resolution (the pipeline would resize the edit image to its own condition size first). The input and
target shown next to the result are the cached latents decoded, i.e. what training sees. No CFG (the negative
prompt would need the text encoder; the live validation runs without one too).

Qwen-Image-2.1 (`Qwen21CachedSampler`): generation is diffusers' `QwenImage21ModularPipeline` itself without its
text-encoder and VAE-encoder blocks (`fusedit.inference.qwen21.encoded_pipeline`, the sampling home `infer.py` uses
too), fed the cached prompt encoding, its Qwen3-VL image slots and the cached reference latents; it loads the 2.1
VAE decoder only, as above.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLQwenImage, QwenImageEditPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from torch import nn

from fusedit.cache.batches import cached_inputs
from fusedit.step.conditioning import EditInputs
from fusedit.step.objective import calculate_shift

log = logging.getLogger(__name__)


@torch.no_grad()
def denoise(module, inputs: EditInputs, scheduler, num_inference_steps: int, seed: int) -> torch.Tensor:
    """Packed latents [B, tokens, C*4] of the edit `inputs` describe (their `target` is not used), sampled as
    the edit pipelines sample, with `module.predict_velocity` (the training step's transformer call)."""
    batch, tokens, packed_channels = inputs.target.shape
    _, height, width = inputs.img_shapes[0][0]
    channels = packed_channels // 4
    device, dtype = inputs.prompt_embeds.device, inputs.prompt_embeds.dtype
    generator = torch.Generator(device=device).manual_seed(seed)
    noise = randn_tensor((batch, 1, channels, 2 * height, 2 * width), generator=generator, device=device, dtype=dtype)
    latents = QwenImageEditPipeline._pack_latents(noise, batch, channels, 2 * height, 2 * width)
    mu = calculate_shift(tokens, scheduler.config)
    sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    timesteps, _ = retrieve_timesteps(scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu)
    scheduler.set_begin_index(0)
    for t in timesteps:
        velocity = module.predict_velocity(latents, inputs, t.expand(batch).to(dtype) / 1000)
        latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
    return latents


class CachedSampler:
    """Validation rows [*edit images, edited, target, prompt] (PIL) from cached samples; loads only the VAE
    decoder, at the first round (see the module docstring)."""

    def __init__(self, model_path: str | Path, scheduler_cls, scheduler_config: dict, dtype: torch.dtype | None):
        self.model_path = Path(model_path)
        self.scheduler_cls = scheduler_cls
        self.scheduler_config = dict(scheduler_config)
        self.dtype = dtype
        self._vae: AutoencoderKLQwenImage | None = None

    def _load_vae(self) -> AutoencoderKLQwenImage:
        if self._vae is None:
            log.info(
                "validation images: loading the VAE decoder of %s (kept on the CPU between rounds)", self.model_path
            )
            vae = AutoencoderKLQwenImage.from_pretrained(self.model_path, subfolder="vae", dtype=self.dtype)
            # Nothing is encoded here. An empty module, not None: the VAE's clear_cache counts the encoder's convs.
            vae.encoder, vae.quant_conv = nn.Module(), nn.Module()
            self._vae = vae.requires_grad_(False).eval()
        return self._vae

    @torch.no_grad()
    def decode(self, packed: torch.Tensor, shape: tuple[int, int, int]) -> list[Image.Image]:
        """Packed normalised latents [B, h*w, C*4] of latent-patch shape (1, h, w) -> PIL images, as the pipeline
        decodes its output."""
        vae = self._load_vae()
        scale = 2 ** len(vae.temperal_downsample)
        _, height, width = shape
        latents = QwenImageEditPipeline._unpack_latents(packed, height * 2 * scale, width * 2 * scale, scale)
        latents = latents.to(next(vae.parameters()).dtype)
        z_dim = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        image = vae.decode(latents * std + mean, return_dict=False)[0][:, :, 0]
        return VaeImageProcessor(vae_scale_factor=scale * 2).postprocess(image, output_type="pil")

    @torch.no_grad()
    def rows(self, module, samples: list[dict], num_inference_steps: int, seed: int) -> list[list]:
        if not samples:
            return []
        device = module.device
        rows = []
        with self._round(module):
            for sample in samples:
                inputs = cached_inputs([sample], device)
                scheduler = self.scheduler_cls.from_config(self.scheduler_config)
                with torch.autocast(device.type, enabled=False):
                    edited = denoise(module, inputs, scheduler, num_inference_steps, seed)
                    shapes = inputs.img_shapes[0]
                    edits = inputs.condition.split([h * w for _, h, w in shapes[1:]], dim=1)
                    pictures = [self.decode(edit, shape)[0] for edit, shape in zip(edits, shapes[1:], strict=True)]
                    pictures += [self.decode(edited, shapes[0])[0], self.decode(inputs.target, shapes[0])[0]]
                rows.append([*pictures, sample["prompt"]])
        return rows

    @contextlib.contextmanager
    def _round(self, module):
        """One validation round: yields the VAE on `module`'s device with the transformer in eval mode; puts the
        transformer's mode back and the VAE on the CPU after (it stays loaded between rounds)."""
        device = module.device
        vae = self._load_vae().to(device)
        was_training = module.transformer.training
        module.transformer.eval()
        try:
            yield vae
        finally:
            module.transformer.train(was_training)
            vae.to("cpu")
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()


class Qwen21CachedSampler(CachedSampler):
    """`CachedSampler` for Qwen-Image-2.1 cache rows (references first, target last, with `image_slots`): the 2.1
    modular pipeline's denoise and decode blocks on the cached encodings (module docstring)."""

    def _load_vae(self) -> nn.Module:
        from diffusers import AutoencoderKLQwenImage21

        if self._vae is None:
            log.info(
                "validation images: loading the VAE decoder of %s (kept on the CPU between rounds)", self.model_path
            )
            vae = AutoencoderKLQwenImage21.from_pretrained(self.model_path, subfolder="vae", torch_dtype=self.dtype)
            vae.encoder, vae.quant_conv = nn.Module(), nn.Module()  # nothing is encoded; conv counts were taken
            self._vae = vae.requires_grad_(False).eval()
        return self._vae

    @torch.no_grad()
    def rows(self, module, samples: list[dict], num_inference_steps: int, seed: int) -> list[list]:
        from fusedit.inference.qwen21 import decode, disable_progress_bars, encoded_pipeline, sample_encoded, unpack
        from fusedit.step.token_weights import PIXELS_PER_TOKEN

        if not samples:
            return []
        device = module.device
        rows = []
        with self._round(module) as vae:
            for sample in samples:
                inputs = cached_inputs([sample], device)
                *references, (_, height, width) = inputs.img_shapes[0]
                packed = inputs.condition.split([h * w for _, h, w in references], dim=1) if references else ()
                latents = [unpack(p, h, w) for p, (_, h, w) in zip(packed, references, strict=True)]
                pipe = encoded_pipeline(module.transformer, vae, self.scheduler_cls.from_config(self.scheduler_config))
                disable_progress_bars(pipe)
                with torch.autocast(device.type, enabled=False):
                    edited = sample_encoded(
                        pipe,
                        inputs.prompt_embeds,
                        inputs.image_slots,
                        latents,
                        height=height * PIXELS_PER_TOKEN,
                        width=width * PIXELS_PER_TOKEN,
                        num_inference_steps=num_inference_steps,
                        seed=seed,
                    )
                    shown = [decode(vae, latent)[0] for latent in latents]
                    target = decode(vae, unpack(inputs.target, height, width))[0]
                rows.append([*(image.convert("RGB") for image in (*shown, edited, target)), sample["prompt"]])
        return rows
