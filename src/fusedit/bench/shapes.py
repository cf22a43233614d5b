"""Benchmark shapes and the random transformer and inputs built from them (nothing is downloaded).

`full` is Qwen-Image-Edit's transformer at its training shape: 60 blocks, 3072 wide (24 heads x 128), a 1024x1024
target plus one 1024x1024 edit image (2 x 4096 = 8192 image tokens), a 256-token prompt, batch 1, LoRA rank 32 on
`attn_mlp`. `tiny` keeps the structure at a size two CPU cores step in well under a second.

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


@dataclass(frozen=True)
class BenchShape:
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

    def __post_init__(self):
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise UserInputError(f"axes_dims_rope {self.axes_dims_rope} must sum to attention_head_dim")
        for height, width in (self.target_size, *self.edit_sizes):
            if height % PIXELS_PER_TOKEN or width % PIXELS_PER_TOKEN:
                raise UserInputError(f"image size {height}x{width} is not a multiple of {PIXELS_PER_TOKEN}")
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

    def replace(self, **changes) -> BenchShape:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {
            **dataclasses.asdict(self),
            "inner_dim": self.inner_dim,
            "image_tokens": self.image_tokens,
            "target_tokens": self.target_tokens,
        }


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


def transformer_config(shape: BenchShape) -> dict:
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
def build_random_transformer(
    shape: BenchShape, device: torch.device | str, dtype: torch.dtype, seed: int = 0
) -> QwenImageTransformer2DModel:
    """The standard-layout transformer with random weights, parameters created directly on `device`.

    Same (shape, seed) -> same weights on a given device, so every variant of one run trains the same model.
    """
    device = torch.device(device)
    # Parameters on meta only: RoPE tables are plain tensors computed in __init__ and must stay real.
    with init_empty_weights(include_buffers=False):
        model = QwenImageTransformer2DModel(**transformer_config(shape))
    # On meta (fusedit.bench.memory) there are no values to draw, and no generator for that device.
    generator = None if device.type == "meta" else torch.Generator(device=device).manual_seed(seed)
    for module_name, module in model.named_modules():
        for name, parameter in list(module.named_parameters(recurse=False)):
            value = torch.empty(parameter.shape, device=device, dtype=dtype)
            if name == "bias":
                value.zero_()
            elif value.dim() == 1:
                value.fill_(1.0)  # norm scales
            else:
                value.normal_(0.0, value.shape[1] ** -0.5, generator=generator)
            module._parameters[name] = nn.Parameter(value, requires_grad=False)
        if any(buffer.is_meta for buffer in module.buffers(recurse=False)):
            raise RuntimeError(f"{module_name} has a buffer left on the meta device")
    # Every parameter is already on `device` and the model has no buffers, so no `.to(device)`: it would be a no-op
    # that fails on the fake tensors of fusedit.bench.memory.
    return model.eval()


def make_inputs(shape: BenchShape, device: torch.device | str, dtype: torch.dtype, seed: int = 0) -> EditInputs:
    """Synthetic conditioning for the timed step: packed latents and prompt embeddings in `dtype` on `device`, as
    the conditioner (or the cache) hands them to the training step; the step draws its noise from its seed."""
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
