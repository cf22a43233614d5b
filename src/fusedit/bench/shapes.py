"""Benchmark shapes and the random transformer and inputs built from them (nothing is downloaded).

Two model families (`BenchShape.family`):

- `qwen-image` (the MMDiT of Qwen-Image-Edit, `QwenImageTransformer2DModel`): `full` is its training shape, 60
  blocks, 3072 wide (24 heads x 128), a 1024x1024 target plus one 1024x1024 edit image (2 x 4096 = 8192 image
  tokens), a 256-token prompt, batch 1, LoRA rank 32 on `attn_mlp`.
- `qwen-image-2.1` (the single-stream `QwenImage21Transformer2DModel`): `full` is diffusers' default config of that
  class, which is the released model's (diffusers 0.42, models/transformers/transformer_qwenimage21.py,
  `QwenImage21Transformer2DModel.__init__`: num_layers=32, num_attention_heads=32, attention_head_dim=128 (4096
  wide), context_in_dim=4096, mlp_ratio=3, in_channels=64, patch_size=1, axes_dims_rope=(16, 56, 56)), at the same
  1024x1024 target + one 1024x1024 reference and 256 prompt text tokens. A 2.1 token is also 16x16 pixels (VAE 16x,
  no patching); each reference shows up in the prompt as one Qwen3-VL image slot per 2x2 latent tokens.

`tiny` keeps each structure at a size two CPU cores step in well under a second.

The model is built with its parameters on the meta device and materialised straight on the target device with
random weights (fan-in scaled normal, so 60 blocks keep finite activations), so a 20B model never touches host RAM.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from accelerate import init_empty_weights
from diffusers import QwenImageTransformer2DModel
from torch import nn

from fusedit.errors import UserInputError
from fusedit.step.conditioning import EditInputs

LATENT_CHANNELS = 16
PATCH = 2
PIXELS_PER_TOKEN = 8 * PATCH  # VAE 8x, then 2x2 patches

MMDIT = "qwen-image"  # fusedit.families.TEXT_TO_IMAGE: every MMDiT member shares the transformer class
QWEN21 = "qwen-image-2.1"  # fusedit.families.QWEN_IMAGE_21
FAMILIES = (MMDIT, QWEN21)
QWEN21_CHANNELS = 64  # AutoencoderKLQwenImage21's latent channels, read unpatched (patch_size=1): also 16 px/token
QWEN21_TOKENS_PER_SLOT = 4  # a Qwen3-VL image slot stands for 2x2 latent tokens (fusedit.step.conditioning_qwen21)


@dataclass(frozen=True)
class BenchShape:
    """A transformer config and one training batch's sizes. `joint_attention_dim` is the width of the prompt
    embeddings (the MMDiT's `joint_attention_dim`, 2.1's `context_in_dim`); `text_tokens` counts the prompt's text
    tokens (for 2.1 without its image slots, which become reference-image tokens); `mlp_ratio` is 2.1's (the MMDiT's
    MLP is 4x, fixed by diffusers)."""

    name: str
    num_layers: int
    num_attention_heads: int
    attention_head_dim: int
    joint_attention_dim: int
    axes_dims_rope: tuple[int, int, int]
    target_size: tuple[int, int]  # (height, width) in pixels
    edit_sizes: tuple[tuple[int, int], ...]  # one (height, width) per edit image
    text_tokens: int
    batch: int = 1
    lora_rank: int = 32
    lora_targets: str = "attn_mlp"
    family: str = MMDIT
    mlp_ratio: int = 3  # QwenImage21Transformer2DModel's; unused for the MMDiT

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise UserInputError(f"benchmark family must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        side = 2 * PIXELS_PER_TOKEN if self.family == QWEN21 else PIXELS_PER_TOKEN  # 2.1: whole 2x2-token slots
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise UserInputError(f"axes_dims_rope {self.axes_dims_rope} must sum to attention_head_dim")
        for height, width in (self.target_size, *self.edit_sizes):
            if height % side or width % side:
                raise UserInputError(f"image size {height}x{width} is not a multiple of {side}")
        if min(self.num_layers, self.text_tokens, self.batch, self.lora_rank) < 1:
            raise UserInputError("layers, text tokens, batch and LoRA rank must all be >= 1")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @staticmethod
    def _grid(size: tuple[int, int]) -> tuple[int, int, int]:
        return (1, size[0] // PIXELS_PER_TOKEN, size[1] // PIXELS_PER_TOKEN)

    @property
    def img_shapes(self) -> list[tuple[int, int, int]]:
        return [self._grid(self.target_size), *(self._grid(size) for size in self.edit_sizes)]

    @property
    def target_tokens(self) -> int:
        _, height, width = self._grid(self.target_size)
        return height * width

    @property
    def image_tokens(self) -> int:
        return sum(frames * height * width for frames, height, width in self.img_shapes)

    @property
    def tokens(self) -> int:
        """Joint sequence length per sample (image + text), the attention's S."""
        return self.image_tokens + self.text_tokens

    @property
    def reference_slots(self) -> int:
        """2.1: the Qwen3-VL image slots the references take in the prompt (one per 2x2 latent tokens); else 0."""
        return (self.image_tokens - self.target_tokens) // QWEN21_TOKENS_PER_SLOT if self.family == QWEN21 else 0

    def replace(self, **changes) -> BenchShape:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {
            **dataclasses.asdict(self),
            "inner_dim": self.inner_dim,
            "image_tokens": self.image_tokens,
            "target_tokens": self.target_tokens,
        }


# size -> the MMDiT's shape (what `fusedit bench` and `fusedit plan` take without a family).
SHAPES = {
    "full": BenchShape(
        name="full",
        num_layers=60,
        num_attention_heads=24,
        attention_head_dim=128,
        joint_attention_dim=3584,
        axes_dims_rope=(16, 56, 56),
        target_size=(1024, 1024),
        edit_sizes=((1024, 1024),),
        text_tokens=256,
        lora_rank=32,
    ),
    "tiny": BenchShape(
        name="tiny",
        num_layers=2,
        num_attention_heads=4,
        attention_head_dim=64,
        joint_attention_dim=128,
        axes_dims_rope=(16, 24, 24),
        target_size=(256, 256),
        edit_sizes=((256, 256),),
        text_tokens=64,
        lora_rank=8,
    ),
}

# size -> Qwen-Image-2.1's shape. `full`: diffusers' QwenImage21Transformer2DModel defaults (module docstring); `tiny`:
# a 2-block model about as quick to step on a CPU as the MMDiT's tiny one.
QWEN21_SHAPES = {
    "full": BenchShape(
        name="full",
        num_layers=32,
        num_attention_heads=32,
        attention_head_dim=128,
        joint_attention_dim=4096,
        axes_dims_rope=(16, 56, 56),
        target_size=(1024, 1024),
        edit_sizes=((1024, 1024),),
        text_tokens=256,
        lora_rank=32,
        family=QWEN21,
        mlp_ratio=3,
    ),
    "tiny": BenchShape(
        name="tiny",
        num_layers=2,
        num_attention_heads=4,
        attention_head_dim=64,
        joint_attention_dim=128,
        axes_dims_rope=(16, 24, 24),
        target_size=(256, 256),
        edit_sizes=((256, 256),),
        text_tokens=64,
        lora_rank=8,
        family=QWEN21,
        mlp_ratio=3,
    ),
}
SHAPES_BY_FAMILY = {MMDIT: SHAPES, QWEN21: QWEN21_SHAPES}


def transformer_config(shape: BenchShape) -> dict:
    """Keyword arguments of the family's diffusers transformer class for `shape`."""
    if shape.family == QWEN21:
        return {
            "patch_size": 1,
            "in_channels": QWEN21_CHANNELS,
            "out_channels": QWEN21_CHANNELS,
            "num_layers": shape.num_layers,
            "attention_head_dim": shape.attention_head_dim,
            "num_attention_heads": shape.num_attention_heads,
            "context_in_dim": shape.joint_attention_dim,
            "mlp_ratio": shape.mlp_ratio,
            "axes_dims_rope": shape.axes_dims_rope,
        }
    return {
        "patch_size": PATCH,
        "in_channels": LATENT_CHANNELS * PATCH * PATCH,
        "out_channels": LATENT_CHANNELS,
        "num_layers": shape.num_layers,
        "attention_head_dim": shape.attention_head_dim,
        "num_attention_heads": shape.num_attention_heads,
        "joint_attention_dim": shape.joint_attention_dim,
        "axes_dims_rope": shape.axes_dims_rope,
    }


@torch.no_grad()
def _model_class(shape: BenchShape) -> type[nn.Module]:
    if shape.family == QWEN21:
        from diffusers import QwenImage21Transformer2DModel

        return QwenImage21Transformer2DModel
    return QwenImageTransformer2DModel


def build_random_transformer(
    shape: BenchShape, device: torch.device | str, dtype: torch.dtype, seed: int = 0
) -> nn.Module:
    """The standard-layout transformer of `shape.family` with random weights, parameters created directly on
    `device` (`QwenImageTransformer2DModel`, or `QwenImage21Transformer2DModel` for 2.1).

    Same (shape, seed) -> same weights on a given device, so every variant of one run trains the same model.
    """
    device = torch.device(device)
    # Parameters on meta only: RoPE tables are plain tensors computed in __init__ and must stay real.
    with init_empty_weights(include_buffers=False):
        model = _model_class(shape)(**transformer_config(shape))
    # On meta (fusedit.bench.memory) there are no values to draw, and no generator for that device.
    generator = None if device.type == "meta" else torch.Generator(device=device).manual_seed(seed)
    for module_name, module in model.named_modules():
        for name, parameter in list(module.named_parameters(recurse=False)):
            value = torch.empty(parameter.shape, device=device, dtype=dtype)
            if name == "bias" or type(module).__name__ == "QwenImage21ZeroCenterRMSNorm":
                value.zero_()  # 2.1's zero-centred norm stores scale - 1
            elif value.dim() == 1:
                value.fill_(1.0)  # norm scales
            else:
                value.normal_(0.0, value.shape[1] ** -0.5, generator=generator)
            module._parameters[name] = nn.Parameter(value, requires_grad=False)
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.is_meta:
                raise RuntimeError(f"{module_name} has a buffer left on the meta device")
            if buffer is not None and device.type != "meta":
                module._buffers[name] = buffer.to(device)  # 2.1's timestep frequencies (computed in __init__)
    # Every parameter and buffer is already on `device`, so no `.to(device)`: it would fail on the fake tensors of
    # fusedit.bench.memory (on meta, 2.1's small timestep-frequency buffer stays a real CPU tensor).
    return model.eval()


def qwen21_image_slots(shape: BenchShape) -> torch.Tensor:
    """[text_tokens + reference slots] bool: where a 2.1 prompt holds its Qwen3-VL image slots. Laid out as the
    2.1 template does, text around each reference's run of slots: the text split evenly before, between and after
    the references."""
    references = len(shape.edit_sizes)
    cuts = [round(shape.text_tokens * i / (references + 1)) for i in range(references + 2)]
    pieces = []
    for index in range(references + 1):
        pieces.append(torch.zeros(cuts[index + 1] - cuts[index], dtype=torch.bool))
        if index < references:
            height, width = (side // PIXELS_PER_TOKEN for side in shape.edit_sizes[index])
            pieces.append(torch.ones(height * width // QWEN21_TOKENS_PER_SLOT, dtype=torch.bool))
    return torch.cat(pieces)


def make_inputs(shape: BenchShape, device: torch.device | str, dtype: torch.dtype, seed: int = 0) -> EditInputs:
    """Synthetic conditioning for the timed step: packed latents and prompt embeddings in `dtype` on `device`, as
    the conditioner (or the cache) hands them to the training step; the step draws its noise from its seed.

    For 2.1 (fusedit.step.conditioning_qwen21's layout) the prompt is `text_tokens` + the references' image slots
    long (`image_slots`), `img_shapes` lists the references first and the target last."""
    if shape.family == QWEN21:
        return _make_qwen21_inputs(shape, device, dtype, seed)
    generator = torch.Generator(device="cpu").manual_seed(seed + 1)
    channels = LATENT_CHANNELS * PATCH * PATCH
    condition_tokens = shape.image_tokens - shape.target_tokens

    def randn(*size):
        return torch.randn(*size, generator=generator).to(device=device, dtype=dtype)

    return EditInputs(
        target=randn(shape.batch, shape.target_tokens, channels),
        condition=randn(shape.batch, condition_tokens, channels),
        prompt_embeds=randn(shape.batch, shape.text_tokens, shape.joint_attention_dim),
        # What a text encoder hands over for unpadded prompts; trimmed to None unless a variant keeps it.
        prompt_mask=torch.ones(shape.batch, shape.text_tokens, dtype=torch.long, device=device),
        img_shapes=[shape.img_shapes] * shape.batch,
    )


def _make_qwen21_inputs(shape: BenchShape, device: torch.device | str, dtype: torch.dtype, seed: int) -> EditInputs:
    generator = torch.Generator(device="cpu").manual_seed(seed + 1)
    condition_tokens = shape.image_tokens - shape.target_tokens
    slots = qwen21_image_slots(shape)

    def randn(*size):
        return torch.randn(*size, generator=generator).to(device=device, dtype=dtype)

    target_shape, *reference_shapes = shape.img_shapes
    return EditInputs(
        target=randn(shape.batch, shape.target_tokens, QWEN21_CHANNELS),
        condition=randn(shape.batch, condition_tokens, QWEN21_CHANNELS),
        prompt_embeds=randn(shape.batch, len(slots), shape.joint_attention_dim),
        prompt_mask=torch.ones(shape.batch, len(slots), dtype=torch.long, device=device),
        img_shapes=[[*reference_shapes, target_shape]] * shape.batch,
        image_slots=slots.to(device).expand(shape.batch, -1).clone(),
    )
