"""Prompt enhancement with the pipeline's own Qwen2.5-VL.

The text encoder of every Qwen-Image pipeline is a full Qwen2.5-VL-7B-Instruct (`Qwen2_5_VLForConditionalGeneration`):
it can generate, not only encode. Before encoding, it rewrites the user's instruction with the input image(s) in
view, following `EDIT_SYSTEM_PROMPT` (or `T2I_SYSTEM_PROMPT` without an input image). No extra model is loaded and
no extra memory is used; the rewritten prompt replaces the user's for the pipeline call and is stored in the run's
JSON record next to the original. Decoding is greedy, so the rewrite is reproducible.

The messages use Qwen's chat format exactly as the diffusers pipelines do (`<|im_start|>role ... <|im_end|>`, one
`Picture N: <|vision_start|><|image_pad|><|vision_end|>` per image), so the processor expands the image tokens the
same way it does for encoding.
"""

from __future__ import annotations

import torch
from PIL import Image

from fusedit.errors import UserInputError

EDIT_SYSTEM_PROMPT = (
    "You rewrite image-editing instructions for an image-editing model. Look at the input image(s) and the user's "
    "instruction, then write one improved instruction that: names the objects to change by their visible "
    "appearance and position; states exactly what changes (colour, material, shape, text, pose, style, added or "
    "removed objects); states what must stay unchanged (identity, layout, background, lighting) when that is "
    "not obvious; keeps any text to render in quotation marks, verbatim; never adds changes the user did not ask "
    "for. Answer with the rewritten instruction only, in the user's language, in at most 80 words."
)
T2I_SYSTEM_PROMPT = (
    "You rewrite prompts for a text-to-image model. Expand the user's prompt into one detailed description of the "
    "image: subject, attributes, composition, setting, lighting, style; keep every detail the user gave and any "
    "text to render in quotation marks, verbatim; add nothing that contradicts it. Answer with the rewritten "
    "prompt only, in the user's language, in at most 120 words."
)
# The VLM only needs to see the image, not read fine detail: the size Qwen-Image-Edit-2509 conditions the VLM at.
VLM_IMAGE_AREA = 384 * 384


def _fit_area(image: Image.Image, area: int) -> Image.Image:
    scale = (area / (image.width * image.height)) ** 0.5
    if scale >= 1:
        return image
    size = (max(28, round(image.width * scale)), max(28, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def chat_text(system_prompt: str, prompt: str, num_images: int) -> str:
    pictures = "".join(f"Picture {i + 1}: <|vision_start|><|image_pad|><|vision_end|>" for i in range(num_images))
    return (
        f"<|im_start|>system\n{system_prompt}<|im_end|>\n"
        f"<|im_start|>user\n{pictures}{prompt}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


@torch.no_grad()
def enhance_prompt(
    pipe,
    prompt: str,
    images: list[Image.Image] | None = None,
    system_prompt: str | None = None,
    max_new_tokens: int = 256,
) -> str:
    """Rewrite `prompt` with `pipe.text_encoder` looking at `images`. Returns the rewritten prompt (stripped)."""
    images = list(images or [])
    if system_prompt is None:
        system_prompt = EDIT_SYSTEM_PROMPT if images else T2I_SYSTEM_PROMPT
    text = chat_text(system_prompt, prompt, len(images))
    if images:
        processor = getattr(pipe, "processor", None)
        if processor is None:
            raise UserInputError(f"{type(pipe).__name__} has no processor; it cannot show images to its text encoder")
        inputs = processor(text=[text], images=[_fit_area(i, VLM_IMAGE_AREA) for i in images], return_tensors="pt")
    else:
        inputs = pipe.tokenizer([text], return_tensors="pt")
    # `_execution_device` follows offload hooks: the encoder's weights may live on the CPU between uses.
    inputs = inputs.to(pipe._execution_device)
    tokenizer = pipe.tokenizer
    generated = pipe.text_encoder.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    new_tokens = generated[0, inputs["input_ids"].shape[1] :]
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
