"""Build the diffusers pipeline for a Qwen-Image checkpoint, with fusedit's transformer plugged in.

The pipeline class follows the model family that `fusedit.detect` reports for the checkpoint, never a guess
from the file name: Qwen-Image (text-to-image), Qwen-Image-Edit, Qwen-Image-Edit-2509 / -2511 (several edit
images), Qwen-Image-2.1 (diffusers' modular `QwenImage21ModularPipeline`, built in `fusedit.inference.qwen21`).
Everything except the transformer (VAE, text encoder, tokenizer, processor, scheduler) is loaded by diffusers' own
`from_pretrained`; the transformer comes from `fusedit.model.load_transformer` in the layout asked for, so the
merged model runs inside diffusers' own sampler.
"""

from __future__ import annotations

import os

import diffusers
import torch

from fusedit.families import PIPELINE_CLASSES, QWEN_IMAGE_21
from fusedit.inference.preflight import model_family
from fusedit.inference.profiles import torch_dtype
from fusedit.model import load_transformer


def build_pipeline(
    path: str | os.PathLike,
    layout: str = "merged_qkv",
    dtype: str | torch.dtype = "bfloat16",
    transformer_path: str | os.PathLike | None = None,
    family: str | None = None,
) -> tuple[diffusers.DiffusionPipeline, str]:
    """Load the pipeline at `path` with its transformer in `layout`. Returns (pipeline, family).

    `transformer_path` replaces the pipeline's own transformer weights (a fine-tuned or merged checkpoint: a
    transformer directory or a single safetensors file, in either layout); the other components still come from
    `path`.
    """
    family = family or model_family(path)
    dtype = torch_dtype(dtype)
    transformer = load_transformer(
        transformer_path or path,
        layout=layout,
        dtype=dtype,
        zero_cond_t=family == "qwen-image-edit-2511",
    )
    if family == QWEN_IMAGE_21:
        from fusedit.inference.qwen21 import pipeline_from_folder

        return pipeline_from_folder(path, transformer, dtype), family
    pipeline_class = getattr(diffusers, PIPELINE_CLASSES[family])
    pipe = pipeline_class.from_pretrained(str(path), transformer=transformer, dtype=dtype)
    return pipe, family


def text_to_image_pipeline(pipe: diffusers.DiffusionPipeline) -> diffusers.DiffusionPipeline:
    """A `QwenImagePipeline` sharing `pipe`'s components (no copy, no reload), for prompts without an input image.

    Qwen-Image-Edit shares Qwen-Image's architecture and text encoder, so an edit checkpoint can also generate from
    text alone; only the prompt template differs, and `QwenImagePipeline` brings its own.
    """
    if isinstance(pipe, diffusers.QwenImagePipeline | diffusers.QwenImage21ModularPipeline):
        return pipe  # 2.1's modular pipeline runs with and without references
    return diffusers.QwenImagePipeline.from_pipe(pipe)


def configure_scheduler(pipe: diffusers.DiffusionPipeline, overrides: dict | None) -> dict:
    """Replace `pipe`'s scheduler by its class built from its config with `overrides` merged in (a preset's
    `sampling.scheduler`, e.g. the Lightning presets' exponential time shift; its keys are checked by the
    preflight, `check_scheduler_overrides`); nothing when `overrides` is empty. Returns the config in use."""
    if overrides:
        scheduler = type(pipe.scheduler).from_config({**pipe.scheduler.config, **overrides})
        if isinstance(pipe, diffusers.QwenImage21ModularPipeline):
            pipe.update_components(scheduler=scheduler)  # a modular pipeline keeps specs of its components
        else:
            pipe.scheduler = scheduler
    return dict(pipe.scheduler.config)
