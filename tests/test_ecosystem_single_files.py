"""Single files as ComfyUI users share them (issue 10 section 3): the Edit-2511 marker and "fp8 scaled" weights.

The right values: an fp8-scaled weight is `fp8.float() * scale_weight` (ComfyUI's `convert_old_quants` and fp8
layouts); the 2511 marker means diffusers' `zero_cond_t=True` (ComfyUI's `model_detection`). The loaded model is
compared with diffusers' own `QwenImageTransformer2DModel` holding the dequantized weights.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fusedit.convert import convert_checkpoint
from fusedit.convert.single_file import MARKER_2511, SCALED_FP8_MARKER
from fusedit.detect import detect
from fusedit.model import load_transformer
from tests.convert_utils import TINY, tiny_transformer

PREFIX = "model.diffusion_model."


def _scaled_fp8_file(path, seed=0, marker_2511=False, per_row=("to_k", "img_mlp")):
    """A ComfyUI-style "fp8 scaled" single file of a tiny transformer, and the weights it stands for.

    Every 2-D weight inside the blocks is stored as float8_e4m3fn with a float32 `scale_weight` (per tensor, or per
    row for the modules named in `per_row`), the others as bf16; `scale_input` = 1 beside the attention ones.
    Returns {standard key: the dequantized float32 tensor}.
    """
    model = tiny_transformer(seed, zero_cond_t=marker_2511)
    tensors, expected = {}, {}
    for key, value in model.state_dict().items():
        value = value.detach().to(torch.bfloat16).float()
        if key.startswith("transformer_blocks.") and key.endswith(".weight") and value.dim() == 2:
            module = key[: -len(".weight")]
            rows = any(name in key for name in per_row)
            amax = value.abs().amax(dim=1) if rows else value.abs().amax()
            scale = (amax / 448.0).clamp(min=1e-12).float()
            fp8 = (value / (scale[:, None] if rows else scale)).to(torch.float8_e4m3fn)
            tensors[PREFIX + key] = fp8
            tensors[PREFIX + module + ".scale_weight"] = scale.reshape(-1) if rows else scale.reshape(())
            if ".attn." in key:
                tensors[PREFIX + module + ".scale_input"] = torch.ones(())
            expected[key] = fp8.float() * (scale[:, None] if rows else scale)
        else:
            tensors[PREFIX + key] = value.to(torch.bfloat16)
            expected[key] = value
    tensors[PREFIX + SCALED_FP8_MARKER] = torch.empty(0, dtype=torch.float8_e4m3fn)
    if marker_2511:
        tensors[PREFIX + MARKER_2511] = torch.empty(0)
    # Real files need no metadata (head size 128, diffusers' default RoPE axes); the tiny model records its own.
    config = {"axes_dims_rope": list(TINY["axes_dims_rope"])}
    save_file(
        tensors, path, metadata={"attention_head_dim": str(TINY["attention_head_dim"]), "config": json.dumps(config)}
    )
    return expected


def _reference(expected: dict, zero_cond_t: bool):
    """diffusers' own model holding the dequantized weights."""
    model = tiny_transformer(0, zero_cond_t=zero_cond_t)
    model.load_state_dict(expected, strict=True)
    return model.eval()


def _inputs(zero_cond_t: bool):
    generator = torch.Generator().manual_seed(1)
    # two images (target + one edit image) when zero_cond_t: the 2511 transformer conditions on the second
    frames = 2 if zero_cond_t else 1
    hidden = torch.randn(1, 16 * frames, 64, generator=generator)
    text = torch.randn(1, 5, TINY["joint_attention_dim"], generator=generator)
    return {
        "hidden_states": hidden,
        "encoder_hidden_states": text,
        "encoder_hidden_states_mask": torch.ones(1, 5),
        "timestep": torch.tensor([0.5]),
        "img_shapes": [[(1, 4, 4)] * frames],
        "return_dict": False,
    }


@pytest.mark.parametrize("layout", ["standard", "merged_qkv"])
@pytest.mark.parametrize("marker_2511", [False, True])
def test_scaled_fp8_file_loads_as_its_dequantized_weights(tmp_path, layout, marker_2511):
    path = tmp_path / "fp8_scaled.safetensors"
    expected = _scaled_fp8_file(path, marker_2511=marker_2511)
    model = load_transformer(path, layout="standard", dtype=torch.float32)
    state = model.state_dict()
    assert sorted(state) == sorted(expected)  # no marker or scale left as a parameter
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    assert model.config.zero_cond_t is marker_2511  # the family comes from the marker

    reference = _reference(expected, marker_2511)
    loaded = load_transformer(path, layout=layout, dtype=torch.float32)
    with torch.no_grad():
        want = reference(**_inputs(marker_2511))[0]
        got = loaded(**_inputs(marker_2511))[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_scaled_fp8_default_dtype_is_bf16(tmp_path):
    path = tmp_path / "f.safetensors"
    expected = _scaled_fp8_file(path)
    model = load_transformer(path, layout="standard")
    key = "transformer_blocks.0.attn.to_q.weight"
    assert model.state_dict()[key].dtype == torch.bfloat16
    assert torch.equal(model.state_dict()[key], expected[key].to(torch.bfloat16))


def test_detect_reports_the_2511_family_and_fp8_scaling(tmp_path):
    path = tmp_path / "f.safetensors"
    expected = _scaled_fp8_file(path, marker_2511=True)
    report = detect(path)
    assert report["kind"] == "model_file" and report["family"] == "qwen-image-edit-2511"
    assert MARKER_2511 in report["family_source"]
    assert report["quantization"] == "fp8_scaled"
    assert report["parameter_count"] == sum(value.numel() for value in expected.values())
    assert report["dtype"] == "F8_E4M3"
    plain = tmp_path / "plain.safetensors"
    save_file({PREFIX + k: v for k, v in tiny_transformer(0).state_dict().items()}, plain)
    assert "family" not in detect(plain) and "quantization" not in detect(plain)


def test_a_2511_file_under_another_pipeline_is_refused(tmp_path):
    path = tmp_path / "f.safetensors"
    _scaled_fp8_file(path, marker_2511=True)
    with pytest.raises(ValueError, match=rf"Qwen-Image-Edit-2511 transformer \(it carries the {MARKER_2511} marker"):
        load_transformer(path, layout="standard", zero_cond_t=False)
    assert load_transformer(path, layout="standard", zero_cond_t=True).config.zero_cond_t


def test_infer_preflight_refuses_a_2511_file_under_a_2509_pipeline(tmp_path, tiny_edit_plus_path):
    from fusedit.errors import UserInputError
    from fusedit.inference.preflight import _check_transformer

    path = tmp_path / "f.safetensors"
    _scaled_fp8_file(path, marker_2511=True)
    with pytest.raises(UserInputError, match="is a qwen-image-edit-2511 transformer .* qwen-image-edit-2509 pipeline"):
        _check_transformer(path, "qwen-image-edit-2509")
    _check_transformer(path, "qwen-image-edit-2511")
    with pytest.raises(UserInputError, match="is a qwen-image-edit-2509 transformer"):
        _check_transformer(tiny_edit_plus_path, "qwen-image-edit-2511")


def test_convert_round_trip_keeps_scales_exact_and_the_marker(tmp_path):
    source = tmp_path / "f.safetensors"
    expected = _scaled_fp8_file(source, marker_2511=True)
    merged, back = tmp_path / "merged.safetensors", tmp_path / "back.safetensors"
    convert_checkpoint(source, merged, "to_merged")
    convert_checkpoint(merged, back, "to_standard")
    with safe_open(str(merged), framework="pt") as handle:
        keys = set(handle.keys())
        qkv_scale = handle.get_tensor(PREFIX + "transformer_blocks.0.attn.to_qkv.scale_weight")
    assert PREFIX + MARKER_2511 in keys and PREFIX + SCALED_FP8_MARKER in keys  # kept as markers
    assert qkv_scale.shape == (3 * 32,)  # one exact scale per row of the merged weight
    assert detect(merged)["family"] == "qwen-image-edit-2511" and detect(merged)["layout"] == "merged_qkv"
    for path in (merged, back):
        state = load_transformer(path, layout="standard", dtype=torch.float32).state_dict()
        for key, value in expected.items():
            assert torch.equal(state[key], value), (path.name, key)


def test_convert_refuses_to_merge_different_input_scales(tmp_path):
    source = tmp_path / "f.safetensors"
    _scaled_fp8_file(source)
    with safe_open(str(source), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        metadata = handle.metadata()
    tensors[PREFIX + "transformer_blocks.1.attn.to_v.scale_input"] = torch.tensor(2.0)
    save_file(tensors, source, metadata=metadata)
    with pytest.raises(ValueError, match=r"transformer_blocks\.1\.attn\.to_q\.scale_input.*the three scales differ"):
        convert_checkpoint(source, tmp_path / "m.safetensors", "to_merged")
    assert not (tmp_path / "m.safetensors").exists()
