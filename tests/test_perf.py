"""Perf switches: prompt-padding trim is exact, SDPA backend selection/report, checkpoint offload, float8 GEMMs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fusedit.bench.measure import profile_step
from fusedit.bench.shapes import SHAPES, build_random_transformer, make_inputs
from fusedit.model.attention import attention_backend, sdpa_backends
from fusedit.model.checkpointing import offloaded_checkpoint, use_offloaded_checkpoints
from fusedit.model.fp8 import Float8ComputeLinear, apply_float8_compute, float8_compute_support
from fusedit.model.merged_qkv import fuse_qkv
from fusedit.step import build
from fusedit.step.conditioning import trim_prompt_padding

SMALL = SHAPES["tiny"].replace(num_layers=2, target_size=(64, 64), edit_sizes=((64, 64),), text_tokens=12)


def _forward(model, inputs, prompt_embeds, prompt_mask):
    hidden = torch.cat([inputs.target, inputs.condition], dim=1)
    return model(
        hidden_states=hidden,
        timestep=torch.full((hidden.shape[0],), 0.5, device=hidden.device),
        encoder_hidden_states=prompt_embeds,
        encoder_hidden_states_mask=prompt_mask,
        img_shapes=inputs.img_shapes,
        return_dict=False,
    )[0]


# -- prompt padding ------------------------------------------------------------------------------------------------


def test_trim_removes_trailing_padding_and_the_mask_for_batch_one():
    embeds = torch.randn(1, 10, 4)
    mask = torch.tensor([[1] * 7 + [0] * 3])
    trimmed, trimmed_mask = trim_prompt_padding(embeds, mask)
    assert trimmed_mask is None
    assert torch.equal(trimmed, embeds[:, :7])


def test_trim_keeps_the_mask_where_batch_items_differ():
    embeds = torch.randn(2, 10, 4)
    mask = torch.tensor([[1] * 5 + [0] * 5, [1] * 8 + [0] * 2])
    trimmed, trimmed_mask = trim_prompt_padding(embeds, mask)
    assert trimmed.shape == (2, 8, 4)
    assert torch.equal(trimmed_mask, mask[:, :8])


def test_all_ones_mask_becomes_none_and_no_mask_passes_through():
    embeds = torch.randn(2, 6, 4)
    assert trim_prompt_padding(embeds, torch.ones(2, 6, dtype=torch.bool))[1] is None
    same, none = trim_prompt_padding(embeds, None)
    assert same is embeds and none is None


def test_trim_rejects_bad_masks():
    with pytest.raises(ValueError, match="does not match"):
        trim_prompt_padding(torch.randn(1, 6, 4), torch.ones(1, 5))
    with pytest.raises(ValueError, match=r"batch item\(s\) \[1\] is all padding"):
        trim_prompt_padding(torch.randn(2, 4, 4), torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]]))


@pytest.mark.parametrize("merged", [False, True])
def test_trimmed_prompt_gives_the_masked_models_output(merged):
    # Batch 1, prompt right-padded by 5: the masked call and the trimmed unmasked call must agree on the image.
    model = build_random_transformer(SMALL, "cpu", torch.float32, seed=3)
    if merged:
        fuse_qkv(model)
    inputs = make_inputs(SMALL, "cpu", torch.float32, seed=3)
    padded = torch.cat([inputs.prompt_embeds, torch.randn(1, 5, SMALL.joint_attention_dim)], dim=1)
    mask = torch.cat([torch.ones(1, SMALL.text_tokens), torch.zeros(1, 5)], dim=1).long()
    with torch.no_grad():
        masked = _forward(model, inputs, padded, mask)
        embeds, trimmed_mask = trim_prompt_padding(padded, mask)
        assert trimmed_mask is None
        trimmed = _forward(model, inputs, embeds, trimmed_mask)
    torch.testing.assert_close(trimmed, masked, rtol=1e-4, atol=1e-5)


# -- attention backend ------------------------------------------------------------------------------------------------


def test_sdpa_backend_names_from_profiler_events():
    assert sdpa_backends(["aten::_scaled_dot_product_flash_attention_for_cpu"]) == ["flash_cpu"]
    assert sdpa_backends(["aten::scaled_dot_product_attention", "aten::_scaled_dot_product_cudnn_attention"]) == [
        "cudnn"
    ]
    assert sdpa_backends(["aten::_scaled_dot_product_flash_attention", "flash_fwd_kernel"]) == ["flash"]
    assert sdpa_backends(["aten::_scaled_dot_product_efficient_attention", "fmha_cutlassF_bf16"]) == ["efficient"]
    assert sdpa_backends(["aten::scaled_dot_product_attention", "aten::bmm", "aten::softmax"]) == ["math"]
    assert sdpa_backends(["aten::mm"]) == []


def test_attention_backend_selects_what_the_profiler_then_reports():
    model = build_random_transformer(SMALL.replace(num_layers=1), "cpu", torch.float32)
    inputs = make_inputs(SMALL, "cpu", torch.float32)

    def step():
        with torch.no_grad():
            _forward(model, inputs, inputs.prompt_embeds, None)
        return 0.0

    device = torch.device("cpu")
    assert profile_step(step, device)["sdpa_backend"] == "flash_cpu"
    with attention_backend("math"):
        assert profile_step(step, device)["sdpa_backend"] == "math"
    with pytest.raises(ValueError, match="attention backend must be one of"), attention_backend("fastest"):
        pass


# -- checkpoint offload ----------------------------------------------------------------------------------------------


def _lora_model(checkpoint_every=0, offload=False):
    model = build_random_transformer(SMALL, "cpu", torch.float32, seed=5)
    fuse_qkv(model)
    torch.manual_seed(0)  # gaussian LoRA init draws from the global generator
    build.lora(model, rank=4, targets="attn_mlp", init="gaussian")
    if checkpoint_every:
        build.activation_checkpointing(model, checkpoint_every)
        if offload:
            use_offloaded_checkpoints(model, pin_memory=False)
    return model


def _grads(model):
    inputs = make_inputs(SMALL, "cpu", torch.float32, seed=5)
    _forward(model, inputs, inputs.prompt_embeds, None).square().mean().backward()
    # The last block's text stream after attention feeds nothing: its adapters get no gradient at all.
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_offloaded_checkpoints_give_the_same_gradients_and_go_through_save_on_cpu(monkeypatch):
    plain = _grads(_lora_model())
    packed = []
    original = torch.autograd.graph.save_on_cpu

    class Spy(original):
        def __init__(self, pin_memory=False, device_type="cuda"):
            super().__init__(pin_memory, device_type)
            pack = self.pack_hook

            def counting_pack(tensor):
                packed.append(tuple(tensor.shape))
                return pack(tensor)

            self.pack_hook = counting_pack

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", Spy)
    offloaded = _grads(_lora_model(checkpoint_every=1, offload=True))
    assert plain.keys() == offloaded.keys()
    for name in plain:
        torch.testing.assert_close(offloaded[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
    # The block inputs (image and text hidden states among them) are what gets offloaded, once per block.
    image_tokens = (1, SMALL.image_tokens, SMALL.inner_dim)
    assert packed.count(image_tokens) >= SMALL.num_layers


def test_offload_needs_checkpointing_and_is_transparent_without_grad():
    with pytest.raises(ValueError, match="needs activation checkpointing"):
        use_offloaded_checkpoints(_lora_model())
    linear = nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with torch.no_grad():
        torch.testing.assert_close(offloaded_checkpoint(linear, x), linear(x))


# -- float8 GEMMs ------------------------------------------------------------------------------------------------------


def test_float8_compute_refuses_cpu_with_a_clear_error():
    supported, reason = float8_compute_support("cpu")
    assert not supported and "compute capability >= 8.9" in reason
    model = build_random_transformer(SMALL.replace(num_layers=1), "cpu", torch.float32)
    with pytest.raises(RuntimeError, match=r"float8 GEMMs need a CUDA GPU .*fp8 storage"):
        apply_float8_compute(model)


def _cpu_scaled_mm_available() -> bool:
    try:
        a = torch.zeros(16, 16, dtype=torch.float8_e4m3fn)
        torch._scaled_mm(a, a.t(), scale_a=torch.tensor(1.0), scale_b=torch.tensor(1.0), out_dtype=torch.float32)
        return True
    except (RuntimeError, NotImplementedError):
        return False


@pytest.mark.skipif(not _cpu_scaled_mm_available(), reason="this torch build has no CPU _scaled_mm")
def test_float8_linear_math_and_no_weight_gradient_gemm():
    # The kernel exists on CPU (emulated), so the math is checked here; the speed only exists on sm89+ GPUs.
    from fusedit.bench.measure import _GemmCounter

    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    fast = Float8ComputeLinear(linear, compute_dtype=torch.float32)
    assert fast.weight.dtype == torch.float8_e4m3fn and not fast.weight.requires_grad
    x = torch.randn(3, 16, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    with _GemmCounter() as forward_gemms:
        out = fast(x)
    expected = linear(x_ref)
    assert forward_gemms.count == 1
    relative = (out - expected).norm() / expected.norm()
    assert relative < 0.05, relative
    grad = torch.randn_like(out)
    with _GemmCounter() as backward_gemms:
        out.backward(grad)
    expected.backward(grad)
    assert backward_gemms.count == 1  # input gradient only: the frozen weight's GEMM never runs
    assert (x.grad - x_ref.grad).norm() / x_ref.grad.norm() < 0.1
    assert fast.weight.grad is None
    with pytest.raises(ValueError, match="multiples of 16"):
        Float8ComputeLinear(nn.Linear(24, 48))


def _sm89() -> bool:
    return torch.cuda.is_available() and float8_compute_support("cuda")[0]


@pytest.mark.gpu
@pytest.mark.skipif(not _sm89(), reason="needs a CUDA GPU with compute capability >= 8.9")
def test_float8_compute_on_gpu_trains_lora_close_to_bf16():
    shape = SMALL.replace(num_layers=2)
    reference = build_random_transformer(shape, "cuda", torch.bfloat16, seed=1)
    fuse_qkv(reference)
    fast = build_random_transformer(shape, "cuda", torch.bfloat16, seed=1)
    fuse_qkv(fast)
    apply_float8_compute(fast)
    torch.manual_seed(0)
    build.lora(fast, rank=4, targets="attn_mlp", init="gaussian", dtype=torch.bfloat16)
    assert any(isinstance(m, Float8ComputeLinear) for m in fast.modules())
    inputs = make_inputs(shape, "cuda", torch.bfloat16, seed=1)
    with torch.no_grad():
        expected = _forward(reference, inputs, inputs.prompt_embeds, None).float()
    out = _forward(fast, inputs, inputs.prompt_embeds, None)
    assert ((out.float() - expected).norm() / expected.norm()) < 0.1
    out.float().square().mean().backward()
    grads = [p.grad for p in fast.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
