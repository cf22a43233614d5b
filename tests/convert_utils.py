"""Shared builders for the conversion and detection tests: tiny Qwen-Image weights and hand-built LoRAs."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

TINY = {
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "axes_dims_rope": (4, 6, 6),
}
HIDDEN = 32


def tiny_transformer(seed: int = 0, **overrides):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(**{**TINY, **overrides})


def tiny_state_dict(dtype: torch.dtype = torch.float32, seed: int = 0, prefix: str = "") -> dict[str, torch.Tensor]:
    """Random weights with diffusers' real key names (random, so q/k/v differ and a swap would show)."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in tiny_transformer(seed).state_dict().items():
        out[prefix + key] = torch.randn(value.shape, generator=generator).to(dtype)
    return out


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """Raw bytes, so fp8 and NaN payloads compare exactly."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def assert_bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))
    for key, value in a.items():
        assert value.dtype == b[key].dtype, key
        assert value.shape == b[key].shape, key
        assert torch.equal(bits(value), bits(b[key])), key


def bf16_valued(shape, seed: int) -> torch.Tensor:
    """fp32 tensor whose values are bf16-representable: products are exact in float64, so sums are too."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(torch.bfloat16).float()


def exact_delta(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    return (B.double() @ A.double()) * scale


def write_header_only(path: Path, shapes: dict[str, tuple[int, ...]], dtype: str = "BF16") -> None:
    """A safetensors header whose data section is a hole (a sparse file, no disk used): detection must work from
    the header alone, and the file is still well-formed (fusedit.io refuses data that ends past the file's end)."""
    sizes = {"BF16": 2, "F32": 4, "F8_E4M3": 1}  # written out here, not taken from the converter under test
    header, offset = {}, 0
    for key, shape in shapes.items():
        n = math.prod(shape) * sizes[dtype]
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        handle.truncate(8 + len(raw) + offset)
