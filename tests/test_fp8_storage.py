"""FP8 storage of the frozen base: correct math, real memory savings, LoRA on top trains, no bf16 weight copies kept."""

import copy

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from fusedit.model import fuse_qkv
from fusedit.model.fp8 import FP8_DTYPE, Fp8StorageLinear, apply_fp8_storage, quantize_fp8
from tests.test_merged_qkv import VARIANTS, make_inputs, relative_error, tiny_transformer


@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_fp8_linear_equals_linear_on_its_dequantized_weight(granularity):
    torch.manual_seed(0)
    linear = nn.Linear(32, 48)
    fp8 = Fp8StorageLinear(linear, granularity, compute_dtype=torch.float32)
    assert fp8.weight.dtype == FP8_DTYPE and not fp8.weight.requires_grad
    x = torch.randn(5, 7, 32, requires_grad=True)
    expected_linear = nn.Linear(32, 48)
    expected_linear.load_state_dict({"weight": fp8.dequantized_weight(torch.float32), "bias": linear.bias})
    x_ref = x.detach().clone().requires_grad_(True)
    out, expected = fp8(x), expected_linear(x_ref)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    out.square().sum().backward()
    expected.square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    # fp8 quantization error is bounded by e4m3's 3 mantissa bits (relative step 2^-3, so <= 2^-4 after rounding)
    error = (fp8.dequantized_weight(torch.float32) - linear.weight).abs()
    assert (error <= linear.weight.abs() * 2**-4 + 1e-6 + (fp8.weight_scale * 2**-9)).all()


def test_row_scales_beat_tensor_scales_on_outlier_rows():
    weight = torch.randn(16, 64)
    weight[0] *= 1e5  # one outlier row crushes the others into fp8's subnormals under a single scale
    errors = {}
    for granularity in ("tensor", "row"):
        quantized, scale = quantize_fp8(weight, granularity)
        errors[granularity] = ((quantized.float() * scale - weight)[1:].abs().mean() / weight[1:].abs().mean()).item()
    assert errors["row"] < errors["tensor"] / 4


def test_transformer_with_fp8_storage_halves_block_memory_and_stays_close():
    reference = fuse_qkv(tiny_transformer())
    quantized = apply_fp8_storage(copy.deepcopy(reference), compute_dtype=torch.float32)
    block_bytes = [
        sum(p.numel() * p.element_size() for p in model.transformer_blocks.parameters())
        for model in (reference, quantized)
    ]
    # fp32 -> fp8 weights (biases stay): at most ~30% of the original, i.e. ~60% of a bf16 copy
    assert block_bytes[1] < 0.3 * block_bytes[0]
    inputs = make_inputs(VARIANTS["edit"][1])
    with torch.no_grad():
        error = relative_error(quantized(**inputs).sample, reference(**inputs).sample)
    assert 0 < error < 0.1


def test_dtype_casts_keep_fp8_storage_and_fp32_scales():
    model = apply_fp8_storage(fuse_qkv(tiny_transformer()))
    layer = model.transformer_blocks[0].attn.to_qkv
    before = layer.weight.detach().clone()
    model.to(torch.bfloat16)
    assert layer.weight.dtype == FP8_DTYPE and layer.weight_scale.dtype == torch.float32
    assert torch.equal(layer.weight.view(torch.uint8), before.view(torch.uint8))


def test_lora_on_fp8_base_trains_in_compute_dtype_and_saves_no_upcast_weights():
    model = fuse_qkv(tiny_transformer()).to(torch.bfloat16)
    model = apply_fp8_storage(model, compute_dtype=torch.bfloat16).requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["to_qkv", "add_qkv_proj"]), model)
    lora_params = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora_params and all(p.dtype == torch.bfloat16 and p.requires_grad for p in lora_params.values())
    for module in lora_params.values():
        module.data.normal_(0, 0.1)

    # Every tensor autograd saves for backward: none may be a bf16 copy of a base weight matrix.
    weight_shapes = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, Fp8StorageLinear)}
    saved_upcasts = []

    def pack(tensor):
        if tensor.dtype == torch.bfloat16 and tuple(tensor.shape) in weight_shapes and not tensor.requires_grad:
            saved_upcasts.append(tuple(tensor.shape))
        return tensor

    inputs = make_inputs(VARIANTS["edit"][1], dtype=torch.bfloat16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**inputs).sample.float().square().mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_params.values())
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    assert saved_upcasts == []


def test_fp8_after_lora_is_refused():
    model = fuse_qkv(tiny_transformer())
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_qkv"]), model)
    with pytest.raises(RuntimeError, match="before LoRA"):
        apply_fp8_storage(model)


def test_qwen21_in_fp8_storage_keeps_its_shared_modulation_and_entry_exit_layers():
    from tests.test_qwen21_merged import make_inputs as qwen21_inputs
    from tests.test_qwen21_merged import tiny_qwen21

    reference = fuse_qkv(tiny_qwen21())
    quantized = apply_fp8_storage(copy.deepcopy(reference), compute_dtype=torch.float32)
    kinds = {name: type(module) for name, module in quantized.named_modules() if isinstance(module, nn.Linear)}
    # every block Linear (the merged to_qkv and gate_up_proj included) is stored in fp8; nothing outside the blocks
    assert {kind for name, kind in kinds.items() if name.startswith("transformer_blocks.")} == {Fp8StorageLinear}
    kept = {name for name, kind in kinds.items() if kind is nn.Linear}
    assert "modulation.1" in kept  # one matrix feeds every block's scales and gates
    assert kept == {name for name in kinds if not name.startswith("transformer_blocks.")}
    assert quantized.modulation[1].weight.dtype == torch.float32
    inputs = qwen21_inputs(1)
    with torch.no_grad():
        error = relative_error(quantized(**inputs).sample, reference(**inputs).sample)
    assert 0 < error < 0.1
