"""Model weights: bit-exact round trips in every dtype, prefixes kept, clear errors."""

import pytest
import torch

from fusedit.convert import convert_state_dict
from tests.convert_utils import assert_bit_equal, bits, tiny_state_dict


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float8_e4m3fn])
def test_round_trip_bit_exact(dtype):
    standard = tiny_state_dict(dtype)
    merged, meta = convert_state_dict(standard, "to_merged", {"note": "kept"})
    assert meta == {"note": "kept"}
    assert not any(".attn.to_q." in k or ".attn.add_k_proj." in k for k in merged)
    for block in range(2):
        p = f"transformer_blocks.{block}.attn."
        for param in ("weight", "bias"):
            expected = torch.cat([standard[f"{p}to_{x}.{param}"] for x in "qkv"])
            assert torch.equal(bits(merged[f"{p}to_qkv.{param}"]), bits(expected))
            expected = torch.cat([standard[f"{p}add_{x}_proj.{param}"] for x in "qkv"])
            assert torch.equal(bits(merged[f"{p}add_qkv_proj.{param}"]), bits(expected))
    assert len(merged) == len(standard) - 2 * 2 * 2 * 2  # per block: 6 -> 2 projections, weight and bias each
    back, _ = convert_state_dict(merged, "to_standard")
    assert_bit_equal(back, standard)


def test_prefix_is_kept():
    standard = tiny_state_dict(prefix="model.diffusion_model.")
    merged, _ = convert_state_dict(standard, "to_merged")
    assert "model.diffusion_model.transformer_blocks.1.attn.to_qkv.weight" in merged
    assert all(k.startswith("model.diffusion_model.") for k in merged)
    assert_bit_equal(convert_state_dict(merged, "to_standard")[0], standard)


def test_already_in_target_layout_is_returned_unchanged():
    standard = tiny_state_dict()
    same, _ = convert_state_dict(standard, "to_standard")
    assert list(same) == list(standard) and all(same[k] is standard[k] for k in standard)
    merged, _ = convert_state_dict(standard, "to_merged")
    again, _ = convert_state_dict(merged, "to_merged")
    assert all(again[k] is merged[k] for k in merged)


def test_missing_sibling_is_named():
    sd = tiny_state_dict()
    del sd["transformer_blocks.1.attn.add_k_proj.bias"]
    with pytest.raises(ValueError, match=r"transformer_blocks\.1\.attn\.add_k_proj\.bias"):
        convert_state_dict(sd, "to_merged")
    sd = tiny_state_dict()
    del sd["transformer_blocks.0.attn.to_q.weight"]
    with pytest.raises(ValueError, match=r"missing q/k/v sibling transformer_blocks\.0\.attn\.to_q\.weight"):
        convert_state_dict(sd, "to_merged")


def test_shape_and_dtype_mismatch_are_named():
    sd = tiny_state_dict()
    sd["transformer_blocks.0.attn.to_v.weight"] = torch.zeros(31, 32)
    with pytest.raises(ValueError, match=r"transformer_blocks\.0\.attn\.to_v\.weight .*\[31, 32\]"):
        convert_state_dict(sd, "to_merged")
    sd = tiny_state_dict()
    sd["transformer_blocks.0.attn.to_k.bias"] = sd["transformer_blocks.0.attn.to_k.bias"].half()
    with pytest.raises(ValueError, match=r"to_k\.bias torch\.float16"):
        convert_state_dict(sd, "to_merged")
    merged, _ = convert_state_dict(tiny_state_dict(), "to_merged")
    merged["transformer_blocks.1.attn.to_qkv.bias"] = torch.zeros(95)
    with pytest.raises(ValueError, match=r"transformer_blocks\.1\.attn\.to_qkv\.bias: shape \[95\]"):
        convert_state_dict(merged, "to_standard")


def test_mixed_layout_and_unknown_tensors_are_named():
    sd = tiny_state_dict()
    merged, _ = convert_state_dict(sd, "to_merged")
    mixed = {**sd, "transformer_blocks.1.attn.to_qkv.weight": merged["transformer_blocks.1.attn.to_qkv.weight"]}
    with pytest.raises(ValueError, match=r"mixes layouts.*to_qkv\.weight"):
        convert_state_dict(mixed, "to_merged")
    unknown = {**sd, "transformer_blocks.0.attn.to_q.running_mean": torch.ones(())}
    with pytest.raises(ValueError, match=r"to_q\.running_mean: only weight and bias"):
        convert_state_dict(unknown, "to_merged")
    # An fp8 scale is converted (test_ecosystem_single_files.py), but only with its k and v siblings.
    sd["transformer_blocks.0.attn.to_q.scale_weight"] = torch.ones(())
    with pytest.raises(ValueError, match=r"to_q\.scale_weight: missing q/k/v sibling"):
        convert_state_dict(sd, "to_merged")
    with pytest.raises(ValueError, match=r"no Qwen-Image attention projections.*conv\.weight"):
        convert_state_dict({"conv.weight": torch.zeros(2)}, "to_merged")
    with pytest.raises(ValueError, match="direction"):
        convert_state_dict(tiny_state_dict(), "sideways")
    with pytest.raises(ValueError, match=r"mixes LoRA keys .* with other keys: img_in\.weight"):
        convert_state_dict({"img_in.weight": torch.zeros(2), "img_in.lora_A.weight": torch.zeros(1, 2)}, "to_merged")


def test_merged_dict_loads_into_a_fused_module_equivalently():
    """The merged tensors are what a Linear(dim, 3*dim) needs: its output is q, k, v side by side."""
    from tests.convert_utils import tiny_transformer

    model = tiny_transformer(seed=3)
    standard = model.state_dict()
    merged, _ = convert_state_dict(standard, "to_merged")
    attn = model.transformer_blocks[0].attn
    x = torch.randn(5, 32)
    fused = torch.nn.functional.linear(
        x, merged["transformer_blocks.0.attn.to_qkv.weight"], merged["transformer_blocks.0.attn.to_qkv.bias"]
    )
    q, k, v = fused.chunk(3, dim=-1)
    torch.testing.assert_close(q, attn.to_q(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(k, attn.to_k(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(v, attn.to_v(x), rtol=0, atol=1e-6)
