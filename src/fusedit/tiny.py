"""Tiny random Qwen-Image pipelines in diffusers' on-disk layout.

`make_tiny(out, variant)` writes `model_index.json`, `transformer/`, `vae/`, `text_encoder/`, `tokenizer/`,
`processor/` and `scheduler/` exactly as the real Qwen-Image checkpoints lay them out, so the code that loads
the 20B model (`QwenImageEditPipeline.from_pretrained(path)` and fusedit's own loaders) is the code the tests
run. Every component is the real class with a tiny config and random weights (fp32); nothing is downloaded.

Variants:
  edit        QwenImageEditPipeline      (Qwen-Image-Edit)
  edit-plus   QwenImageEditPlusPipeline  (Qwen-Image-Edit-2509: several edit images)
  edit-2511   QwenImageEditPlusPipeline  with the transformer's `zero_cond_t=True` (Qwen-Image-Edit-2511)
  t2i         QwenImagePipeline          (Qwen-Image text-to-image)
  2.1         QwenImage21Pipeline        (Qwen-Image-2.1: Qwen3-VL encoder + processor, 64-channel RGBA VAE,
                                          single-stream transformer; diffusers' QwenImage21ModularPipeline loads
                                          the folder too, with `from_pretrained`)

What keeps a CPU run at seconds:
  * The edit pipelines always resize the *edit image* to a ~1024x1024 area before the VAE encodes it (the
    `height`/`width` arguments only size the output), so the edit stream is 4096 tokens whatever you pass.
    The VAE is therefore kept very narrow (`base_dim=8`) while its geometry stays real (8x spatial
    compression, 16 latent channels, Qwen-Image's latents_mean/std), keeping the weights at a few MB.
    That encode still costs ~2 s on 2 CPU cores (full-resolution element-wise work, not VAE width), and the
    pipelines' public API offers no way around it; fusedit's own training/inference code encodes at its own
    resolution and does not pay it.
  * The VLM sees the image through the processor, which resizes to at most `max_pixels`; the tiny processor
    caps that at 112x112 (16 image tokens) instead of Qwen's 12.8 MP.
  * Pass a small `height=width=64` (a multiple of 16) for the generated image.

The tokenizer is a byte-level BPE with Qwen2's pre-tokenizer, built offline: every byte is a token (any text
encodes), Qwen's special tokens are present, and every word of the pipelines' prompt templates is one token,
so the fixed prefixes the pipelines drop (`prompt_template_encode_start_idx` = 34 / 64 tokens) are exactly the
system prompt, as with the real tokenizer.

Builds are deterministic: the same (variant, seed, num_layers) gives bit-identical safetensors files.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from fusedit.errors import OutputExistsError, UserInputError
from fusedit.io import current_umask, fsync_dir

QWEN21 = "2.1"
VARIANTS = ("edit", "edit-plus", "edit-2511", "t2i", QWEN21)

_PIPELINE_CLASS = {
    "edit": "QwenImageEditPipeline",
    "edit-plus": "QwenImageEditPlusPipeline",
    "edit-2511": "QwenImageEditPlusPipeline",
    "t2i": "QwenImagePipeline",
    QWEN21: "QwenImage21Pipeline",
}

# Qwen2 / Qwen2.5-VL added tokens, in Qwen's order. The first 14 are special (never split, skipped on decode).
_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
_PLAIN_ADDED_TOKENS = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)

# Text the pipelines wrap around prompts; their words become single tokens (see module docstring).
_TEMPLATE_TEXTS = (
    (
        "system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
        "relationships of the objects and background:\nuser\n\nassistant\n"
    ),
    (
        "system\nDescribe the key features of the input image (color, shape, size, texture, objects, background), "
        "then explain how the user's text instruction should alter or modify the image. Generate a new image "
        "that meets the user's requirements while maintaining consistency with the original input where "
        "appropriate.\nuser\n\nassistant\n"
    ),
    "Picture 1: Picture 2: Picture 3: ",
)
# Qwen-Image-2.1's template (diffusers' QwenImage21Pipeline / modular text encoder step), for the 2.1 tokenizer.
_TEMPLATE_TEXTS_21 = ("system\nComprehend and analyze the provided prompt.\nuser\n\nassistant\n",)

# Qwen-Image VAE latent statistics (vae/config.json of the real checkpoints).
_LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                 0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]  # fmt: skip
_LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]  # fmt: skip

TEXT_HIDDEN = 32  # the VLM's hidden size == the transformer's joint_attention_dim
_PATCH, _MERGE = 14, 2  # Qwen2.5-VL vision patch size and spatial merge; the processor must agree
_MIN_PIXELS, _MAX_PIXELS = 56 * 56, 112 * 112


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2 / Qwen byte-level alphabet: printable bytes map to themselves, the rest to chars from U+0100 on.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


def _apply_bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(itertools.pairwise(symbols))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2 :]
    return symbols


def build_tokenizer(template_texts: tuple[str, ...] = _TEMPLATE_TEXTS):
    """A Qwen2Tokenizer (byte-level BPE, Qwen's pre-tokenizer and special tokens) built without the hub; every word
    of `template_texts` is one token."""
    from transformers import Qwen2Tokenizer

    alphabet = _bytes_to_unicode()
    vocab = {alphabet[b]: b for b in range(256)}
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}

    pre_tokenizer = Qwen2Tokenizer(vocab=dict(vocab), merges=[])._tokenizer.pre_tokenizer
    pieces = [piece for text in template_texts for piece, _ in pre_tokenizer.pre_tokenize_str(text)]
    for piece in dict.fromkeys(pieces):
        # Appending a lowest-priority merge never changes how earlier pieces encode (they are already one
        # token), so growing merges until this piece is one token keeps every earlier piece one token too.
        symbols = _apply_bpe(list(piece), ranks)
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            symbols = _apply_bpe(symbols, ranks)

    for token in _SPECIAL_TOKENS + _PLAIN_ADDED_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        extra_special_tokens=list(_SPECIAL_TOKENS[1:]),
        model_max_length=32768,
        errors="replace",
    )
    from tokenizers import AddedToken

    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in _PLAIN_ADDED_TOKENS])
    return tokenizer


def _padded_vocab_size(tokenizer) -> int:
    # Qwen pads the embedding table beyond the tokenizer (152064 vs 151665); keep that shape of mismatch.
    return (len(tokenizer) + 63) // 64 * 64


def _build_processor(tokenizer):
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    size = {"shortest_edge": _MIN_PIXELS, "longest_edge": _MAX_PIXELS}
    image_processor = Qwen2VLImageProcessor(size=size, patch_size=_PATCH, merge_size=_MERGE, temporal_patch_size=2)
    video_processor = Qwen2VLVideoProcessor(size=size, patch_size=_PATCH, merge_size=_MERGE, temporal_patch_size=2)
    return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor)


def _build_text_encoder(tokenizer):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    head_dim = 16
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": _padded_vocab_size(tokenizer),
            "hidden_size": TEXT_HIDDEN,
            "intermediate_size": 2 * TEXT_HIDDEN,
            "num_hidden_layers": 2,
            "num_attention_heads": TEXT_HIDDEN // head_dim,
            "num_key_value_heads": 1,
            "max_position_embeddings": 4096,
            "max_window_layers": 2,
            "rms_norm_eps": 1e-6,
            # M-RoPE: temporal/height/width sections of the rotary half-dim, like Qwen's [16, 24, 24] of 64.
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
            "bos_token_id": ids("<|endoftext|>"),
            "eos_token_id": ids("<|im_end|>"),
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": TEXT_HIDDEN,
            "patch_size": _PATCH,
            "spatial_merge_size": _MERGE,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [1],
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


# ------------------------------------------------------------------------------------------------ Qwen-Image-2.1
# Qwen3-VL sees images in 16 px patches merged 2x2, so one vision token is a 32 px tile = 2x2 latent tokens of the
# 16x VAE: the processor must keep diffusers' resized reference images as they are (sizes between the bounds).
_PATCH_21 = 16
_MIN_PIXELS_21, _MAX_PIXELS_21 = 32 * 32, 128 * 128
# Qwen3-VL's chat template, reduced to what diffusers' 2.1 pipelines render with it: the system message (its
# token count is the prefix they drop) and image placeholders.
_CHAT_TEMPLATE_21 = (
    "{%- for message in messages -%}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
    "{%- for item in message['content'] -%}{%- if item['type'] == 'text' -%}{{ item['text'] }}"
    "{%- else -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def _build_processor_21(tokenizer):
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    size = {"shortest_edge": _MIN_PIXELS_21, "longest_edge": _MAX_PIXELS_21}
    geometry = {"patch_size": _PATCH_21, "merge_size": _MERGE, "temporal_patch_size": 2}
    image_processor = Qwen2VLImageProcessor(size=size, image_mean=[0.5] * 3, image_std=[0.5] * 3, **geometry)
    video_processor = Qwen3VLVideoProcessor(size=size, **geometry)
    return Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=_CHAT_TEMPLATE_21,
    )


def _build_text_encoder_21(tokenizer):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    head_dim = 16
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": _padded_vocab_size(tokenizer),
            "hidden_size": TEXT_HIDDEN,
            "intermediate_size": 2 * TEXT_HIDDEN,
            "num_hidden_layers": 2,
            "num_attention_heads": TEXT_HIDDEN // head_dim,
            "num_key_value_heads": 1,
            "head_dim": head_dim,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [2, 3, 3]},
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": TEXT_HIDDEN,
            "patch_size": _PATCH_21,
            "spatial_merge_size": _MERGE,
            "temporal_patch_size": 2,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0],
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    return Qwen3VLForConditionalGeneration(config).eval()


def _build_transformer_21(num_layers: int):
    from diffusers import QwenImage21Transformer2DModel

    return QwenImage21Transformer2DModel(
        in_channels=64,  # 2.1 reads the VAE's 64 latent channels unpatched
        out_channels=64,
        num_layers=num_layers,
        attention_head_dim=16,
        num_attention_heads=2,
        context_in_dim=TEXT_HIDDEN,
        axes_dims_rope=(4, 6, 6),
    )


def _build_vae_21():
    from diffusers import AutoencoderKLQwenImage21

    # Real geometry (RGBA in and out, 64 latent channels, 16x spatial compression: four downsamplings, and
    # 2.1's latents_mean/std, diffusers' defaults), narrow channels.
    return AutoencoderKLQwenImage21(
        base_dim=8,
        decoder_base_dim=8,
        z_dim=64,
        dim_mult=[1, 2, 2, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True, True],
    )


def _build_tiny_pipeline_21(seed: int, num_layers: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImage21Pipeline

    from fusedit.step.objective import QWEN_SCHEDULER_CONFIG

    tokenizer = build_tokenizer(_TEMPLATE_TEXTS_21)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1000 + 1)
        transformer = _build_transformer_21(num_layers)
        torch.manual_seed(seed * 1000 + 2)
        vae = _build_vae_21()
        torch.manual_seed(seed * 1000 + 3)
        text_encoder = _build_text_encoder_21(tokenizer)
    return QwenImage21Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        processor=_build_processor_21(tokenizer),
        transformer=transformer,
    )


# ------------------------------------------------------------------------------------------------ Qwen-Image
def _build_transformer(variant: str, num_layers: int):
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,  # 16 latent channels packed 2x2
        out_channels=16,
        num_layers=num_layers,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_HIDDEN,
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),  # frame/height/width, summing to the head dim like Qwen's (16, 56, 56)
        zero_cond_t=variant == "edit-2511",
    )


def _build_vae():
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=16,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True, True],
        latents_mean=list(_LATENTS_MEAN),
        latents_std=list(_LATENTS_STD),
    )


def build_tiny_pipeline(variant: str = "edit", seed: int = 0, num_layers: int = 2):
    """The tiny pipeline object in memory (what `make_tiny` saves)."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fusedit.step.objective import QWEN_SCHEDULER_CONFIG

    if variant not in VARIANTS:
        raise UserInputError(f"unknown tiny variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if num_layers < 1:
        raise UserInputError(f"num_layers must be >= 1, got {num_layers}")
    if variant == QWEN21:
        return _build_tiny_pipeline_21(seed, num_layers)
    tokenizer = build_tokenizer()
    # Each component gets its own seeded stream so adding or resizing one does not reshuffle the others,
    # and fork_rng leaves the caller's global RNG state untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1000 + 1)
        transformer = _build_transformer(variant, num_layers)
        torch.manual_seed(seed * 1000 + 2)
        vae = _build_vae()
        torch.manual_seed(seed * 1000 + 3)
        text_encoder = _build_text_encoder(tokenizer)
    components = {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER_CONFIG),
    }
    if variant != "t2i":
        components["processor"] = _build_processor(tokenizer)
    return getattr(diffusers, _PIPELINE_CLASS[variant])(**components)


def _finalize_tree(root: Path) -> None:
    # mkdtemp and the savers' own temp files are private (0700/0600); give the result ordinary permissions,
    # then flush everything so the rename that publishes it is durable.
    umask = current_umask()
    for dirpath, _, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~umask)
        for name in filenames:
            file = os.path.join(dirpath, name)
            os.chmod(file, 0o666 & ~umask)
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(Path(dirpath))


@contextlib.contextmanager
def _no_shard_progress_bar():
    """transformers' `save_pretrained` draws a "Writing model shards" bar per model it saves (the text encoder);
    for one small shard it is noise in make-tiny's output, so it is switched off for the save and restored after."""
    from transformers.utils import logging as transformers_logging

    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


def _build_into_temp(out: Path, variant: str, seed: int, num_layers: int) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        pipe = build_tiny_pipeline(variant, seed, num_layers)
        with _no_shard_progress_bar():
            pipe.save_pretrained(tmp, safe_serialization=True)
        _finalize_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def make_tiny(
    out: str | os.PathLike,
    variant: str = "edit",
    seed: int = 0,
    num_layers: int = 2,
    overwrite: bool = False,
) -> Path:
    """Write a tiny random `variant` pipeline to `out` (built in a temp dir next to it, then renamed in)."""
    out = Path(out)
    if variant not in VARIANTS:
        raise UserInputError(f"unknown tiny variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(out, "exists and is not a directory")
    if _is_nonempty_dir(out) and not overwrite:
        raise OutputExistsError(out, "directory exists and is not empty")
    tmp = _build_into_temp(out, variant, seed, num_layers)
    if _is_nonempty_dir(out):
        # A directory cannot be renamed over a non-empty one: move the old one aside first, so `out` is only
        # ever absent between two renames and is never a mix of old and new files.
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.replace(out, trash)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


def tiny_variant(path: str | os.PathLike) -> str:
    """The variant of a pipeline directory written by `make_tiny` (from model_index.json and the transformer)."""
    path = Path(path)
    index_file = path / "model_index.json"
    try:
        class_name = json.loads(index_file.read_text())["_class_name"]
        zero_cond_t = json.loads((path / "transformer" / "config.json").read_text()).get("zero_cond_t", False)
    except (OSError, ValueError, KeyError) as error:
        raise UserInputError(f"{path}: not a diffusers pipeline directory ({error})") from None
    for variant, name in _PIPELINE_CLASS.items():
        if name == class_name and (variant == "edit-2511") == bool(zero_cond_t):
            return variant
    raise UserInputError(f"{index_file}: pipeline class {class_name!r} is not a Qwen-Image variant fusedit knows")


def ensure_tiny(path: str | os.PathLike, variant: str = "edit", seed: int = 0, num_layers: int = 2) -> Path:
    """Return `path`, first creating a tiny `variant` pipeline there if it does not exist.

    Safe when several processes race: each builds privately and renames into place; a loser keeps the
    winner's directory and discards its own.
    """
    path = Path(path)
    if not _is_nonempty_dir(path):
        tmp = _build_into_temp(path, variant, seed, num_layers)
        try:
            os.replace(tmp, path)
        except OSError:
            if not _is_nonempty_dir(path):
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    found = tiny_variant(path)
    if found != variant:
        raise UserInputError(f"{path}: holds a {found!r} pipeline, but a {variant!r} one was asked for")
    return path


TINY_DIR = "tiny-edit"


def default_model_path(cache_dir: str | os.PathLike) -> Path:
    """The tiny Qwen-Image-Edit pipeline used when `model.path` is null (created under `cache_dir` on first use)."""
    return ensure_tiny(Path(cache_dir) / TINY_DIR, "edit")


def add_cli(subparsers) -> None:
    """Register `fusedit make-tiny OUT [--variant ...] [--seed N] [--layers N] [--overwrite]`."""
    parser = subparsers.add_parser(
        "make-tiny",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("out", type=Path, help="output directory")
    parser.add_argument("--variant", choices=VARIANTS, default="edit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=2, help="number of transformer blocks")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    parser.set_defaults(func=_cli_make_tiny)


def _cli_make_tiny(args: argparse.Namespace) -> int:
    print(make_tiny(args.out, args.variant, seed=args.seed, num_layers=args.layers, overwrite=args.overwrite))
    return 0
