"""Qwen-Image single files as the ecosystem shares them: ComfyUI's Edit-2511 marker and "fp8 scaled" weights.

Two kinds of tensor in these files are not weights of the diffusers model:

- `__index_timestep_zero__` (an empty tensor, under the file's key prefix): ComfyUI's mark of an Edit-2511
  transformer (its `model_detection` sets the reference method "index_timestep_zero" from it, the behaviour
  diffusers switches on with the config's `zero_cond_t=True`). fusedit reads it as the family, never as a weight.
  A converted 2511 single file keeps it, so the output is still recognised as 2511 (by ComfyUI and by fusedit).
- "fp8 scaled" files (ComfyUI's older quantized format, `comfy.utils.convert_old_quants`): a `scaled_fp8` marker
  tensor at the top level, and for each quantized Linear a float8 `weight` with a float32 `scale_weight` beside
  it; the stored value is `weight / scale`, so the weight is `fp8.float() * scale_weight` (ComfyUI's fp8 layouts
  dequantize the same way). An optional `scale_input` is a static activation scale for fp8 matmuls; fusedit
  computes in bf16/fp32 and does not need it.

Key-level rules here (no tensor needed) are shared by `fusedit.detect`, `fusedit.convert` and the loader; the
one function that touches tensors, `dequantize_scaled_fp8`, is what the loader applies.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

MARKER_2511 = "__index_timestep_zero__"
SCALED_FP8_MARKER = "scaled_fp8"
WEIGHT_SCALE = "scale_weight"
INPUT_SCALE = "scale_input"
# The float dtype a scaled-fp8 file's weights are restored to when the caller asks for none (the dtype these
# models are trained and shared in; float32 would double a 20B model's 40 GB).
DEQUANTIZED_DEFAULT = "bfloat16"


def leaf(key: str) -> str:
    return key.rpartition(".")[2]


def is_marker(key: str) -> bool:
    """A marker tensor (2511 or scaled-fp8), under any key prefix: a flag, not a weight."""
    return leaf(key) in (MARKER_2511, SCALED_FP8_MARKER) or key in (MARKER_2511, SCALED_FP8_MARKER)


def is_scale(key: str) -> bool:
    return leaf(key) in (WEIGHT_SCALE, INPUT_SCALE)


def has_2511_marker(keys: Iterable[str]) -> bool:
    return any(leaf(key) == MARKER_2511 for key in keys)


def is_scaled_fp8(keys: Iterable[str]) -> bool:
    """True for ComfyUI's "fp8 scaled" format: a `scaled_fp8` marker or `scale_weight` tensors."""
    return any(leaf(key) in (SCALED_FP8_MARKER, WEIGHT_SCALE) for key in keys)


def weight_keys(keys: Iterable[str]) -> list[str]:
    """The keys that are model parameters: every key but the markers and the fp8 scales."""
    return [key for key in keys if not is_marker(key) and not is_scale(key)]


def dequantize_scaled_fp8(state_dict: Mapping, dtype) -> dict:
    """`state_dict` (torch tensors) with every `<module>.weight` that has a `<module>.scale_weight` replaced by
    `weight.float() * scale_weight` in `dtype`, and without markers and scales.

    A scale is one number (per tensor) or one per output row (shape [out] or [out, 1]). Raises ValueError naming
    the key for a scale of another shape, a non-finite scale, or a scale without its weight.
    """
    import torch

    out = {}
    problems = []
    for key, tensor in state_dict.items():
        if is_marker(key) or is_scale(key):
            continue
        scale = state_dict.get(f"{key[: -len('weight')]}{WEIGHT_SCALE}") if key.endswith("weight") else None
        if scale is None:
            out[key] = tensor
            continue
        rows = tensor.shape[0] if tensor.dim() else 1
        if scale.numel() == 1:
            factor = scale.reshape(()).float()
        elif scale.numel() == rows:
            factor = scale.reshape(rows, *([1] * (tensor.dim() - 1))).float()
        else:
            problems.append(f"{key}: scale_weight of shape {list(scale.shape)} fits neither the tensor nor its rows")
            continue
        if not bool(torch.isfinite(factor).all()):
            problems.append(f"{key}: scale_weight is not finite")
            continue
        out[key] = (tensor.float() * factor).to(dtype)
    orphans = [
        key
        for key in state_dict
        if leaf(key) == WEIGHT_SCALE and f"{key[: -len(WEIGHT_SCALE)]}weight" not in state_dict
    ]
    problems += [f"{key}: a scale_weight without its weight" for key in orphans]
    if problems:
        raise ValueError("fp8-scaled checkpoint: " + "; ".join(problems[:8]))
    return out
