"""Prompts that do not fit the transformer's text positions, found before step 1 with the pipeline's own code.

diffusers' Qwen-Image RoPE has a table of `TEXT_POSITIONS` (4,096) positions; the text of a sample takes the
positions `max_vid_index .. max_vid_index + L` (`QwenEmbedRope.forward`), where `max_vid_index` is the largest
half side, in latent patches, of the sample's images (target and edit images: RoPE is centred, `scale_rope`) and
`L` the length of the prompt embedding: the templated prompt with each edit image's `<|image_pad|>` expanded by
the processor to that image's vision tokens, minus the template prefix the pipeline drops. A longer prompt is a
shape error inside the transformer, at its batch.

`L` is counted by the pipeline's own `_get_qwen_prompt_embeds` (its template, image prompt, processor and
`prompt_template_encode_start_idx`), built from the folder's tokenizer and processor only: a stand-in text encoder
returns an empty hidden state per token, so no weight is read. The edit images' vision tokens depend only on the
size the VLM is shown (`fusedit.step.conditioning.vlm_size`, the size the conditioner resizes them to); they are
counted once per size on a blank image and added to the count of the prompt with the smallest image the processor
accepts.
"""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path
from types import SimpleNamespace

log = logging.getLogger(__name__)

TEXT_POSITIONS = 4096  # diffusers' QwenEmbedRope: pos_freqs over torch.arange(4096)
LONG_PROMPT_CHOICES = ("raise", "truncate")
PATCH = 16  # pixels per latent patch: VAE factor 8 x 2x2 packing


def text_positions_left(image_sizes: list[tuple[int, int]]) -> int:
    """Text positions left after the images (width, height in pixels) of one sample take theirs."""
    max_vid_index = max((max(h // PATCH // 2, w // PATCH // 2) for w, h in image_sizes), default=0)
    return TEXT_POSITIONS - max_vid_index


class _TokenCountingEncoder:
    """Stands in for Qwen2.5-VL in `_get_qwen_prompt_embeds`: one zero-width hidden state per input token."""

    dtype = None

    def __call__(self, input_ids, attention_mask, **_):
        import torch

        hidden = torch.zeros(*input_ids.shape, 1)
        return SimpleNamespace(hidden_states=[hidden])


class _Shortens:
    """`shorten` for a counter with `tokenizer` and `count(prompt, edit_sizes)`."""

    def shorten(self, prompt: str, edit_sizes: list[tuple[int, int]], limit: int) -> tuple[str, int]:
        """The longest start of `prompt` (whole tokens) whose `L` is at most `limit`, and that `L`."""
        tokens = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        length = self.count(prompt, edit_sizes)
        keep = len(tokens) - max(0, length - limit)
        while keep > 0:
            text = self.tokenizer.decode(tokens[:keep])
            length = self.count(text, edit_sizes)
            if length <= limit:
                return text, length
            keep -= max(1, length - limit)  # a decode can merge tokens differently at the cut
        return "", self.count("", edit_sizes)


class PromptCounter(_Shortens):
    """Counts the prompt-embedding length `L` of (prompt, edit image sizes) for the pipeline at `pipeline_dir`."""

    def __init__(self, pipeline_dir: str | Path):
        import diffusers
        from transformers import AutoProcessor, AutoTokenizer

        from fusedit.families import PIPELINE_CLASSES, folder_family

        pipeline_dir = Path(pipeline_dir)
        self.family = folder_family(pipeline_dir)
        pipeline_class = getattr(diffusers, PIPELINE_CLASSES[self.family])
        self.tokenizer = AutoTokenizer.from_pretrained(pipeline_dir / "tokenizer")
        self.processor = AutoProcessor.from_pretrained(pipeline_dir / "processor")
        # Only the text side of the pipeline: its template, image prompt and prefix length, with our stand-in encoder.
        self.pipeline = pipeline_class(
            scheduler=None, vae=None, text_encoder=None, tokenizer=self.tokenizer, processor=self.processor,
            transformer=None,
        )  # fmt: skip
        self.pipeline.text_encoder = _TokenCountingEncoder()
        self.multi_image = self.family in ("qwen-image-edit-2509", "qwen-image-edit-2511")
        image_processor = self.processor.image_processor
        factor = image_processor.patch_size * image_processor.merge_size
        self._small = max(factor, math.ceil(math.sqrt(getattr(image_processor, "min_pixels", 0) or 0)))

    def vlm_size(self, width: int, height: int) -> tuple[int, int]:
        """The size an edit image of `width` x `height` is shown to the VLM (fusedit.step.conditioning.vlm_size)."""
        from fusedit.step.conditioning import vlm_size

        return vlm_size(width, height, self.multi_image)

    @functools.lru_cache(maxsize=256)  # noqa: B019 - one counter per data module; sizes repeat across rows
    def _image_tokens(self, size: tuple[int, int]) -> int:
        from PIL import Image

        pad = self.processor.image_token
        ids = self.processor(text=[pad], images=[Image.new("RGB", size)], return_tensors="pt")["input_ids"][0]
        return int((ids == self.tokenizer.convert_tokens_to_ids(pad)).sum())

    def count(self, prompt: str, edit_sizes: list[tuple[int, int]]) -> int:
        """`L` for `prompt` with edit images of `edit_sizes` (width, height of the edit tensors, in pixels)."""
        from PIL import Image

        small = (self._small, self._small)
        images = [Image.new("RGB", small) for _ in edit_sizes]
        image = images if self.multi_image else (images[0] if images else None)
        embeds, _ = self.pipeline._get_qwen_prompt_embeds(prompt=[prompt], image=image, device="cpu")
        extra = sum(self._image_tokens(self.vlm_size(*size)) - self._image_tokens(small) for size in edit_sizes)
        return int(embeds.shape[1]) + extra


class TextToImagePromptCounter(_Shortens):
    """`L` for diffusers' `QwenImagePipeline` (Qwen-Image, and the text-to-image jobs an edit model runs): the
    templated prompt's tokens past the template prefix the pipeline drops (`prompt_template_encode_start_idx`).

    Counted without the truncation the pipeline's tokenizer call applies at `tokenizer_max_length` (1,024), so
    that a prompt it would cut is seen; `encode_prompt` then keeps only the first `max_sequence_length` (512 by
    default) of those positions. Both cuts are silent in diffusers. Tokenizer only: no weight, no processor.
    """

    def __init__(self, pipeline_dir: str | Path):
        import diffusers
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(Path(pipeline_dir) / "tokenizer")
        text_side = diffusers.QwenImagePipeline(
            scheduler=None, vae=None, text_encoder=None, tokenizer=self.tokenizer, transformer=None
        )
        self.template = text_side.prompt_template_encode
        self.template_start = text_side.prompt_template_encode_start_idx
        self.tokenizer_max_length = text_side.tokenizer_max_length

    def count(self, prompt: str, edit_sizes: list[tuple[int, int]] = ()) -> int:
        """`L` of `prompt` (text-to-image: `edit_sizes` must be empty)."""
        if edit_sizes:
            raise ValueError("a text-to-image prompt has no edit images")
        return len(self.tokenizer(self.template.format(prompt))["input_ids"]) - self.template_start


# Qwen-Image-2.1 (diffusers' QwenImage21Rope): one position axis for the joint sequence. Every text token takes
# the next position; an image block takes max(latent height, latent width) of them (its own grid is centred on 0
# on the other two axes), references in their text slots and the target last. The table holds positions
# 0 .. 8191 (`torch.arange(8192)`, then 1,024 negative ones for the centred grids): a position past 8191 reads a
# negative position's entry, silently, so the last one used (the target's, after all the text and references)
# must stay below QWEN21_POSITIONS.
QWEN21_POSITIONS = 8192
QWEN21_TOKEN_PIXELS = 16  # one 2.1 latent token per 16x16 pixels (16x VAE, no 2x2 packing)


def qwen21_reference_size(width: int, height: int, output_resolution: int) -> tuple[int, int]:
    """The size (width, height, pixels) diffusers' 2.1 pipeline resizes a reference of `width` x `height` to: about
    `output_resolution` squared pixels in its aspect, sides multiples of 32 (`calculate_dimensions`)."""
    from diffusers.modular_pipelines.qwenimage21.encoders import calculate_dimensions

    resized_width, resized_height, _ = calculate_dimensions(output_resolution * output_resolution, width / height)
    return int(resized_width), int(resized_height)


def qwen21_text_positions_left(reference_sizes: list[tuple[int, int]]) -> int:
    """The most text tokens a 2.1 prompt may have beside references of `reference_sizes` (width, height in pixels,
    as the pipeline resized them): QWEN21_POSITIONS minus one for the target's own and the references' positions."""
    taken = sum(max(w, h) // QWEN21_TOKEN_PIXELS for w, h in reference_sizes)
    return QWEN21_POSITIONS - 1 - taken


class _PositionCountingEncoder:
    """Stands in for Qwen3-VL in diffusers' `get_qwenimage21_prompt_embeds`: one zero-width hidden state per input
    token, and the `model.norm` it hooks (never called)."""

    dtype = None

    def __init__(self):
        import torch

        self.model = SimpleNamespace(norm=torch.nn.Identity())

    def __call__(self, input_ids, attention_mask, **_):
        import torch

        return SimpleNamespace(hidden_states=[torch.zeros(*input_ids.shape, 1)])


class Qwen21PromptCounter(_Shortens):
    """Counts the text tokens of a Qwen-Image-2.1 prompt as diffusers' pipeline encodes it (`count(prompt,
    reference_sizes)`): its template (system prefix dropped, one `<imageN>` slot per reference) through the
    folder's Qwen3-VL processor, minus the image slots, which the references' latent tokens fill.

    Only the processor is read (no weights): `get_qwenimage21_prompt_embeds` runs with a stand-in encoder on the
    smallest images the processor takes; the slots are counted from its image mask and taken off, so the count
    does not depend on the references' sizes (their positions are `qwen21_text_positions_left`'s)."""

    def __init__(self, pipeline_dir: str | Path):
        from transformers import AutoProcessor

        self.processor = AutoProcessor.from_pretrained(Path(pipeline_dir) / "processor")
        self.tokenizer = self.processor.tokenizer
        image_processor = self.processor.image_processor
        factor = image_processor.patch_size * image_processor.merge_size
        self._small = max(factor, math.ceil(math.sqrt(getattr(image_processor, "min_pixels", 0) or 0)))
        self._encoder = _PositionCountingEncoder()

    def count(self, prompt: str, reference_sizes: list[tuple[int, int]] = ()) -> int:
        """Text tokens of `prompt` with `len(reference_sizes)` references (their sizes do not change it)."""
        from diffusers.modular_pipelines.qwenimage21.encoders import get_qwenimage21_prompt_embeds
        from PIL import Image

        images = [Image.new("RGB", (self._small, self._small)) for _ in reference_sizes] or None
        embeds, _, image_slots = get_qwenimage21_prompt_embeds(
            self._encoder, self.processor, prompt=[prompt], image=images, device="cpu"
        )
        return int(embeds.shape[1]) - int(image_slots.sum())
