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

Qwen-Image-2.1 (`Qwen21PromptCounter`) has another budget: its RoPE (diffusers' `QwenImage21Rope`, in
`models/transformers/transformer_qwenimage21.py`) has a frame-axis table of `QWEN21_ROPE_POSITIONS` (8,192)
positions, then 1,024 negative ones. Text tokens advance the frame position by one each, every image block
(references in the text stream, then the target) takes one frame position and advances it by max(h, w) of its
latent grid, so the target's frame index is (text tokens) + sum over references of max(h, w). Past 8,191 the index
runs silently into the negative positions (a wrong image, no error), later an IndexError. The text tokens are those
of the prompt embedding diffusers' `get_qwenimage21_prompt_embeds` gives (the 2.1 template with one `<imageN>` slot
per reference, the system prefix dropped) minus its image slots; they do not depend on the references' sizes. The
Qwen3-VL encoder itself has no cut (that function tokenizes without truncation).
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
PATCH = 16  # pixels per latent patch: VAE factor 8 x 2x2 packing (2.1: VAE factor 16, unpacked)
QWEN21_ROPE_POSITIONS = 8192  # diffusers' QwenImage21Rope: frame positions over torch.arange(8192)


def text_positions_left(image_sizes: list[tuple[int, int]]) -> int:
    """Text positions left after the images (width, height in pixels) of one sample take theirs."""
    max_vid_index = max((max(h // PATCH // 2, w // PATCH // 2) for w, h in image_sizes), default=0)
    return TEXT_POSITIONS - max_vid_index


def qwen21_text_positions_left(reference_sizes: list[tuple[int, int]]) -> int:
    """Text tokens a Qwen-Image-2.1 sample may have beside references of `reference_sizes` (width, height in
    pixels): the target's frame index, text tokens + sum of max(h, w) over the references, must stay below
    `QWEN21_ROPE_POSITIONS` (module docstring). The target's own size does not count."""
    return QWEN21_ROPE_POSITIONS - 1 - sum(max(h // PATCH, w // PATCH) for w, h in reference_sizes)


def qwen21_reference_size(width: int, height: int, output_resolution: int) -> tuple[int, int]:
    """The size (width, height, pixels) diffusers' 2.1 pipeline resizes a reference of `width` x `height` to: about
    `output_resolution` squared pixels in its aspect, sides multiples of 32 (`calculate_dimensions`)."""
    from diffusers.modular_pipelines.qwenimage21.encoders import calculate_dimensions

    resized_width, resized_height, _ = calculate_dimensions(output_resolution * output_resolution, width / height)
    return int(resized_width), int(resized_height)


class _TokenCountingEncoder:
    """Stands in for Qwen2.5-VL in `_get_qwen_prompt_embeds`: one zero-width hidden state per input token."""

    dtype = None

    def __call__(self, input_ids, attention_mask, **_):
        import torch

        hidden = torch.zeros(*input_ids.shape, 1)
        return SimpleNamespace(hidden_states=[hidden])


class _Qwen3VLCountingEncoder(_TokenCountingEncoder):
    """Stands in for Qwen3-VL in `get_qwenimage21_prompt_embeds`, which hooks `model.norm` (an identity here)."""

    def __init__(self):
        from torch import nn

        self.model = SimpleNamespace(norm=nn.Identity())


class _Shortens:
    """`shorten` for a counter with `tokenizer` and `count(prompt, edit_sizes)`."""

    counted = "template and edit images' vision tokens included"  # what `count` includes, for refusals

    def room(self, limit: int) -> str:
        """How the limit reads in a refusal."""
        return f"the transformer has {limit} text positions left beside this row's images ({TEXT_POSITIONS} in all)"

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

    def limit(self, target: tuple[int, int], edit_sizes: list[tuple[int, int]]) -> int:
        """The most `L` a row with these target and edit sizes (width, height in pixels) may have."""
        return text_positions_left([target, *edit_sizes])

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

    def limit(self, target: tuple[int, int], edit_sizes: list[tuple[int, int]] = ()) -> int:
        """The RoPE's text positions beside the target, and at most QwenImagePipeline's `tokenizer_max_length`
        (its tokenizer call would cut the rest silently)."""
        return min(text_positions_left([target, *edit_sizes]), self.tokenizer_max_length)

    def room(self, limit: int) -> str:
        return f"QwenImagePipeline keeps {limit}"

    def count(self, prompt: str, edit_sizes: list[tuple[int, int]] = ()) -> int:
        """`L` of `prompt` (text-to-image: `edit_sizes` must be empty)."""
        if edit_sizes:
            raise ValueError("a text-to-image prompt has no edit images")
        return len(self.tokenizer(self.template.format(prompt))["input_ids"]) - self.template_start


class Qwen21PromptCounter(_Shortens):
    """Text tokens of (prompt, reference sizes) for the Qwen-Image-2.1 pipeline at `pipeline_dir`, counted by
    diffusers' own `get_qwenimage21_prompt_embeds` (its template and system-prefix drop) with the folder's Qwen3-VL
    processor and a stand-in encoder: no weight is read. Each reference is shown as the smallest image the processor
    takes: the text tokens do not depend on its size (module docstring)."""

    def __init__(self, pipeline_dir: str | Path):
        from transformers import AutoProcessor

        self.processor = AutoProcessor.from_pretrained(Path(pipeline_dir) / "processor")
        self.tokenizer = self.processor.tokenizer
        image_processor = self.processor.image_processor
        factor = image_processor.patch_size * image_processor.merge_size
        size = getattr(image_processor, "size", None) or {}
        min_pixels = getattr(image_processor, "min_pixels", None) or size.get("shortest_edge") or 0
        self._small = factor * max(1, math.ceil(math.sqrt(min_pixels) / factor))

    counted = "the 2.1 template included, the references' image slots not"

    def limit(self, target: tuple[int, int], edit_sizes: list[tuple[int, int]]) -> int:
        return qwen21_text_positions_left(list(edit_sizes))

    def room(self, limit: int) -> str:
        return (
            f"the 2.1 transformer's RoPE has {limit} frame positions left for text beside this row's reference "
            f"images ({QWEN21_ROPE_POSITIONS} in all)"
        )

    def count(self, prompt: str, edit_sizes: list[tuple[int, int]] = ()) -> int:
        """Text tokens (image slots not counted) of `prompt` with references of `edit_sizes` (width, height)."""
        from diffusers.modular_pipelines.qwenimage21.encoders import get_qwenimage21_prompt_embeds
        from PIL import Image

        images = [Image.new("RGBA", (self._small, self._small)) for _ in edit_sizes] or None
        _, mask, slots = get_qwenimage21_prompt_embeds(
            _Qwen3VLCountingEncoder(), self.processor, prompt=[prompt], image=images, device="cpu"
        )
        return int(mask.sum()) - int(slots.sum())


def prompt_counter(pipeline_dir: str | Path) -> PromptCounter | TextToImagePromptCounter | Qwen21PromptCounter:
    """The counter for the family of the pipeline at `pipeline_dir` (fusedit.families)."""
    from fusedit.families import QWEN_IMAGE_21, TEXT_TO_IMAGE, folder_family

    family = folder_family(Path(pipeline_dir))
    if family == QWEN_IMAGE_21:
        return Qwen21PromptCounter(pipeline_dir)
    return (TextToImagePromptCounter if family == TEXT_TO_IMAGE else PromptCounter)(pipeline_dir)
