"""LoRA layout conversion: merged -> standard exact, standard -> merged product-exact, alpha never lost."""

import math

import pytest
import torch

from fusedit.convert import LoraModule, LoraWeights, convert_lora_layout, convert_state_dict
from fusedit.convert.lora_formats import lora_from_state_dict, lora_to_state_dict
from tests.convert_utils import bf16_valued, exact_delta

D = 32
ATTN = "transformer_blocks.0.attn."


def module(rank, alpha, seed, out=D, dtype=torch.float32):
    return LoraModule(bf16_valued((rank, D), seed).to(dtype), bf16_valued((out, rank), seed + 100).to(dtype), alpha)


def standard_lora(specs, dtype=torch.float32):
    """specs: {proj: (rank, alpha)} for projections of block 0, plus an MLP module that must pass through."""
    modules = {f"{ATTN}{proj}": module(r, a, i, dtype=dtype) for i, (proj, (r, a)) in enumerate(specs.items())}
    modules["transformer_blocks.0.img_mlp.net.0.proj"] = module(4, 3.0, 50, out=128)
    return LoraWeights(modules)


def slice_delta(merged: LoraModule, index: int) -> torch.Tensor:
    return exact_delta(merged.A, merged.B, merged.scale)[index * D : (index + 1) * D]


def test_merged_to_standard_is_exact():
    merged = LoraWeights(
        {f"{ATTN}to_qkv": module(8, 5.0, 1, out=3 * D), f"{ATTN}add_qkv_proj": module(4, 2.0, 2, 3 * D)}
    )
    standard = convert_lora_layout(merged, "to_standard")
    assert sorted(standard.modules) == sorted(
        f"{ATTN}{p}" for p in ("to_q", "to_k", "to_v", *(f"add_{x}_proj" for x in "qkv"))
    )
    for i, proj in enumerate(("to_q", "to_k", "to_v")):
        part, whole = standard.modules[f"{ATTN}{proj}"], merged.modules[f"{ATTN}to_qkv"]
        assert torch.equal(part.A, whole.A) and torch.equal(part.B, whole.B[i * D : (i + 1) * D])
        assert part.alpha == 5.0 and part.rank == 8  # alpha != rank survives unchanged
        assert torch.equal(exact_delta(part.A, part.B, part.scale), slice_delta(whole, i))
    # and back: q/k/v share A, rank and alpha, so the merge restores the original bit for bit
    again = convert_lora_layout(standard, "to_merged")
    for name, original in merged.modules.items():
        assert torch.equal(again.modules[name].A, original.A) and torch.equal(again.modules[name].B, original.B)
        assert again.modules[name].alpha == original.alpha


@pytest.mark.parametrize(
    "specs",
    [
        {"to_q": (4, 8.0), "to_k": (4, 8.0), "to_v": (4, 8.0)},  # same scale, different A: rank 12 block diagonal
        {"to_q": (4, 8.0), "to_k": (6, 12.0), "to_v": (2, 4.0)},  # different ranks, same scale 2
        {"to_q": (4, 8.0), "to_k": (6, 3.0), "to_v": (2, 7.0)},  # scales 2, 0.5, 3.5: folded into B
        {"to_q": (4, 3.0), "to_v": (2, 3.0)},  # to_k not targeted: zero block; scales 0.75, 1.5
    ],
)
def test_standard_to_merged_preserves_every_product_exactly(specs):
    lora = standard_lora(specs)
    merged = convert_lora_layout(lora, "to_merged")
    whole = merged.modules[f"{ATTN}to_qkv"]
    assert whole.rank == sum(r for r, _ in specs.values())
    for i, proj in enumerate(("to_q", "to_k", "to_v")):
        part = lora.modules.get(f"{ATTN}{proj}")
        expected = exact_delta(part.A, part.B, part.scale) if part else torch.zeros(D, D, dtype=torch.float64)
        # bf16-valued fp32 factors: float64 products are exact, folds by these ratios too, so torch.equal holds
        assert torch.equal(slice_delta(whole, i), expected), proj
    mlp = "transformer_blocks.0.img_mlp.net.0.proj"
    assert merged.modules[mlp] is lora.modules[mlp]
    # split again: original ranks back, every product unchanged, untouched blocks bit-identical
    back = convert_lora_layout(merged, "to_standard")
    assert sorted(back.modules) == sorted(lora.modules)
    for name, original in lora.modules.items():
        got = back.modules[name]
        assert got.rank == original.rank
        assert torch.equal(exact_delta(got.A, got.B, got.scale), exact_delta(original.A, original.B, original.scale))
        ratio = original.scale / whole.scale
        if ratio == 2.0 ** round(math.log2(ratio)):  # unfolded exactly: the original file comes back
            assert torch.equal(got.B, original.B) and got.alpha == original.alpha
        assert torch.equal(got.A, original.A)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 2**-23), (torch.bfloat16, 2**-8)])
def test_fold_by_a_non_dyadic_ratio_is_within_one_rounding(dtype, tolerance):
    lora = standard_lora({"to_q": (4, 4.0), "to_k": (4, 4.0), "to_v": (3, 1.0)}, dtype=dtype)  # v scale 1/3
    whole = convert_lora_layout(lora, "to_merged").modules[f"{ATTN}to_qkv"]
    assert whole.scale == 1.0
    v = lora.modules[f"{ATTN}to_v"]
    expected = exact_delta(v.A, v.B, v.scale)
    error = (slice_delta(whole, 2) - expected).abs().max() / expected.abs().max()
    assert 0 < error <= 4 * tolerance  # each B element rounded once when 1/3 is folded in
    q = lora.modules[f"{ATTN}to_q"]
    assert torch.equal(slice_delta(whole, 0), exact_delta(q.A, q.B, q.scale))


def test_alpha_survives_state_dict_conversion_in_metadata():
    lora = standard_lora({"to_q": (4, 1.0), "to_k": (4, 1.0), "to_v": (4, 1.0)})
    mlp = lora.modules["transformer_blocks.0.img_mlp.net.0.proj"]
    # scale 1/2: the diffusers format folds it into lora_B and reading takes it back out exactly (a power of two)
    lora.modules["transformer_blocks.0.img_mlp.net.0.proj"] = LoraModule(mlp.A, mlp.B, 2.0)
    sd, meta = lora_to_state_dict(lora, "diffusers")
    assert not any(k.endswith(".alpha") for k in sd)
    merged_sd, merged_meta = convert_state_dict(sd, "to_merged", meta)
    assert f"transformer.{ATTN}to_qkv.lora_A.weight" in merged_sd
    merged = lora_from_state_dict(merged_sd, merged_meta)
    assert merged.modules[f"{ATTN}to_qkv"].scale == 0.25  # alpha 1, rank 4 -> scale 1/4, not 1
    assert merged.modules["transformer_blocks.0.img_mlp.net.0.proj"].alpha == 2.0
    back_sd, back_meta = convert_state_dict(merged_sd, "to_standard", merged_meta)
    back = lora_from_state_dict(back_sd, back_meta)
    for name, original in lora.modules.items():
        assert back.modules[name].rank == original.rank and back.modules[name].alpha == original.alpha
        assert torch.equal(back.modules[name].A, original.A) and torch.equal(back.modules[name].B, original.B)


def test_noop_and_errors_name_keys():
    lora = standard_lora({"to_q": (4, 4.0), "to_k": (4, 4.0), "to_v": (4, 4.0)})
    sd, meta = lora_to_state_dict(lora, "kohya")
    same, same_meta = convert_state_dict(sd, "to_standard", meta)
    assert same.keys() == sd.keys() and same_meta == meta

    bad = dict(sd)
    bad["lora_unet_transformer_blocks_0_attn_to_q.lora_mid.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"not LoRA factors \(LoCon mid factor\): .*lora_mid\.weight"):
        convert_state_dict(bad, "to_merged")
    bad = dict(sd)
    bad["lora_unet_transformer_blocks_0_attn_to_q.lora_middle"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"keys in no LoRA key style .*lora_middle"):
        convert_state_dict(bad, "to_merged")
    bad = dict(sd)
    del bad["lora_unet_transformer_blocks_0_attn_to_k.lora_up.weight"]
    with pytest.raises(ValueError, match=r"transformer_blocks\.0\.attn\.to_k has \['A', 'alpha'\]"):
        convert_state_dict(bad, "to_merged")
    bad = dict(sd)
    bad["lora_unet_transformer_blocks_0_attn_to_v.lora_up.weight"] = torch.zeros(D, 3)
    with pytest.raises(ValueError, match=r"lora_unet_transformer_blocks_0_attn_to_v\.lora_down\.weight \[4, 32\]"):
        convert_state_dict(bad, "to_merged")
    wide = standard_lora({"to_q": (4, 4.0), "to_k": (4, 4.0), "to_v": (4, 4.0)})
    wide.modules[f"{ATTN}to_v"] = LoraModule(torch.zeros(4, 16), torch.zeros(D, 4), 4.0)
    with pytest.raises(ValueError, match=r"to_v A\[4, 16\]"):
        convert_lora_layout(wide, "to_merged")
    mixed = standard_lora({"to_q": (4, 4.0), "to_k": (4, 4.0), "to_v": (4, 4.0)})
    mixed.modules[f"{ATTN}add_qkv_proj"] = module(2, 2.0, 9, out=3 * D)
    with pytest.raises(ValueError, match=r"mixes layouts.*add_qkv_proj"):
        convert_lora_layout(mixed, "to_standard")
    mixed_sd, _ = lora_to_state_dict(mixed.__class__({**lora.modules}), "diffusers")
    mixed_sd[f"diffusion_model.{ATTN}to_out.0.lora_A.weight"] = torch.zeros(2, D)
    mixed_sd[f"diffusion_model.{ATTN}to_out.0.lora_B.weight"] = torch.zeros(D, 2)
    with pytest.raises(ValueError, match=r"mixed LoRA key formats"):
        convert_state_dict(mixed_sd, "to_merged")
    with pytest.raises(ValueError, match=r"name no Qwen-Image transformer module: transformer\.down_blocks"):
        convert_state_dict({"transformer.down_blocks.0.lora_A.weight": torch.zeros(1, 2)}, "to_merged")
