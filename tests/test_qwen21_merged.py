"""Qwen-Image-2.1 with merged projections is diffusers' 2.1 model computed with fewer GEMMs: equal outputs and
gradients (both attention paths, with and without reference images, checkpointing on and off), exact unfuse."""

import copy

import pytest
import torch
from diffusers import QwenImage21Transformer2DModel
from diffusers.models.transformers.transformer_qwenimage21 import (
    QwenImage21AttnProcessor,
    QwenImage21FlexAttnProcessor,
)

from fusedit.model.merged_qwen21 import (
    MergedQwenImage21AttnProcessor,
    MergedQwenImage21FlexAttnProcessor,
    fuse_projections,
    is_merged,
    unfuse_projections,
)
from tests.test_merged_qkv import ProjectionGemmCounter, relative_error

CONTEXT_DIM = 24
CHANNELS = 8
TARGET = (1, 4, 4)
REFERENCE = (1, 2, 4)


def tiny_qwen21(seed=0):
    torch.manual_seed(seed)
    model = QwenImage21Transformer2DModel(
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        context_in_dim=CONTEXT_DIM,
        in_channels=CHANNELS,
        out_channels=CHANNELS,
        axes_dims_rope=(4, 6, 6),
    )
    with torch.no_grad():  # no trivially zero weight (diffusers zero-centres the text norm)
        for parameter in model.parameters():
            parameter.normal_(0, 0.2)
    return model.eval()


def make_inputs(references: int, batch=2, seed=1):
    """2.1's inputs: a prompt whose vision-language sequence holds each reference's slots (one per 2x2 latent
    tokens) between text, then the target's slots; latents are the references' tokens then the target's."""
    generator = torch.Generator().manual_seed(seed)
    slots = [False] * 3
    for _ in range(references):
        slots += [True] * (REFERENCE[1] * REFERENCE[2] // 4) + [False] * 2
    text_len = len(slots)
    img_mask = torch.tensor(slots + [True] * (TARGET[1] * TARGET[2] // 4))
    shapes = [REFERENCE] * references + [TARGET]
    tokens = sum(f * h * w for f, h, w in shapes)
    text_mask = torch.ones(batch, text_len, dtype=torch.bool)
    text_mask[1, 1] = False  # a padded prompt position exercises the key mask
    return {
        "hidden_states": torch.randn(batch, tokens, CHANNELS, generator=generator),
        "encoder_hidden_states": torch.randn(batch, text_len, CONTEXT_DIM, generator=generator),
        "encoder_hidden_states_mask": text_mask,
        "timestep": torch.rand(batch, generator=generator),
        "img_shapes": [shapes] * batch,
        "img_mask": img_mask[None].expand(batch, -1),
    }


def forward_and_input_grads(model, inputs):
    inputs = {key: value.clone() if torch.is_tensor(value) else value for key, value in inputs.items()}
    inputs["hidden_states"].requires_grad_(True)
    inputs["encoder_hidden_states"].requires_grad_(True)
    out = model(**inputs).sample
    (out * torch.linspace(-1, 1, out.shape[-1], device=out.device)).sum().backward()
    return out.detach(), inputs["hidden_states"].grad, inputs["encoder_hidden_states"].grad


@pytest.fixture(scope="module")
def reference_model():
    return tiny_qwen21()


@pytest.mark.parametrize("references", [0, 2])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_forward_and_input_gradients_match_diffusers(reference_model, references, checkpointing):
    reference = copy.deepcopy(reference_model)
    merged = fuse_projections(copy.deepcopy(reference))
    assert is_merged(merged) and not is_merged(reference)
    if checkpointing:
        reference.enable_gradient_checkpointing()
        merged.enable_gradient_checkpointing()
    inputs = make_inputs(references)
    expected, actual = forward_and_input_grads(reference, inputs), forward_and_input_grads(merged, inputs)
    assert expected[0].abs().max() > 0.1
    for merged_value, reference_value in zip(actual, expected, strict=True):
        assert relative_error(merged_value, reference_value) <= 1e-5
    # The merged weights' gradients are the parts' gradients, stacked.
    block, merged_block = reference.transformer_blocks[0], merged.transformer_blocks[0]
    qkv_grad = torch.cat([getattr(block.attn, name).weight.grad for name in ("to_q", "to_k", "to_v")])
    assert relative_error(merged_block.attn.to_qkv.weight.grad, qkv_grad) <= 1e-5
    gate_up_grad = torch.cat([block.img_mlp.gate_layer.weight.grad, block.img_mlp.proj.weight.grad])
    assert relative_error(merged_block.img_mlp.gate_up_proj.weight.grad, gate_up_grad) <= 1e-5


def test_each_block_matches_diffusers_with_input_gradients(reference_model):
    reference = copy.deepcopy(reference_model)
    merged = fuse_projections(copy.deepcopy(reference))
    captured = {}

    def capture(module, args, kwargs):
        captured.setdefault("kwargs", kwargs)

    handle = reference.transformer_blocks[0].register_forward_pre_hook(capture, with_kwargs=True)
    with torch.no_grad():
        reference(**make_inputs(1))
    handle.remove()
    block_inputs = captured["kwargs"]
    for index, block in enumerate(reference.transformer_blocks):
        results = []
        for candidate in (block, merged.transformer_blocks[index]):
            hidden = block_inputs["hidden_states"].clone().requires_grad_(True)
            out = candidate(**{**block_inputs, "hidden_states": hidden})
            (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
            results.append((out.detach(), hidden.grad))
        for merged_value, reference_value in zip(results[1], results[0], strict=True):
            assert relative_error(merged_value, reference_value) <= 1e-5


def test_flex_block_causal_path_matches_diffusers_forward(reference_model, references=1):
    # flex_attention has no backward on CPU; its gradients are checked on a GPU (test below).
    reference = copy.deepcopy(reference_model)
    reference.set_attn_processor(QwenImage21FlexAttnProcessor())
    merged = fuse_projections(copy.deepcopy(reference))
    assert all(type(block.attn.processor) is MergedQwenImage21FlexAttnProcessor for block in merged.transformer_blocks)
    inputs = make_inputs(references)
    with torch.no_grad():
        expected = reference(**inputs).sample
        actual = merged(**inputs).sample
        exact_sdpa = unfuse_projections(copy.deepcopy(merged))
        exact_sdpa.set_attn_processor(QwenImage21AttnProcessor())
        sdpa = exact_sdpa(**inputs).sample
    assert relative_error(actual, expected) <= 1e-5
    assert relative_error(actual, sdpa) <= 1e-5  # the two paths are the same attention


def test_set_attn_processor_on_a_merged_model_installs_the_merged_counterpart(reference_model):
    merged = fuse_projections(copy.deepcopy(reference_model))
    merged.set_attn_processor(QwenImage21FlexAttnProcessor())  # as diffusers' docs switch a compiled model to flex
    assert all(type(block.attn.processor) is MergedQwenImage21FlexAttnProcessor for block in merged.transformer_blocks)
    merged.transformer_blocks[1].attn.set_processor(QwenImage21AttnProcessor())
    assert type(merged.transformer_blocks[1].attn.processor) is MergedQwenImage21AttnProcessor
    with pytest.raises(TypeError, match="transformer_blocks.0.attn has processor AttnProcessor2_0"):
        from diffusers.models.attention_processor import AttnProcessor2_0

        merged.transformer_blocks[0].attn.set_processor(AttnProcessor2_0())
    restored = unfuse_projections(merged)
    restored.set_attn_processor(QwenImage21AttnProcessor())  # diffusers' own set_processor again
    assert type(restored.transformer_blocks[0].attn.processor) is QwenImage21AttnProcessor


@pytest.fixture
def fp32_matmul():
    """fp32 GEMMs on CUDA, not TF32: another test (an inference profile) may have switched TF32 on for the process."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.mark.gpu
@pytest.mark.parametrize("checkpointing", [False, True])
def test_flex_path_gradients_match_diffusers_on_gpu(reference_model, checkpointing, fp32_matmul):
    if not torch.cuda.is_available():
        pytest.skip("flex_attention's backward needs a GPU")
    reference = copy.deepcopy(reference_model).cuda()
    reference.set_attn_processor(QwenImage21FlexAttnProcessor())
    merged = fuse_projections(copy.deepcopy(reference))
    if checkpointing:
        reference.enable_gradient_checkpointing()
        merged.enable_gradient_checkpointing()
    inputs = {key: value.cuda() if torch.is_tensor(value) else value for key, value in make_inputs(2).items()}
    expected, actual = forward_and_input_grads(reference, inputs), forward_and_input_grads(merged, inputs)
    for merged_value, reference_value in zip(actual, expected, strict=True):
        assert relative_error(merged_value, reference_value) <= 1e-5


def test_kv_cached_decode_matches_diffusers(reference_model):
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

    reference = copy.deepcopy(reference_model)
    merged = fuse_projections(copy.deepcopy(reference))
    inputs = make_inputs(1)
    outputs = []
    with torch.no_grad():
        for model in (reference, merged):
            cache = QwenImage21KVCache(len(model.transformer_blocks))
            model(**inputs, kv_cache=cache, kv_cache_mode="extract")
            outputs.append(model(**inputs, kv_cache=cache, kv_cache_mode="cached").sample)
    assert relative_error(outputs[1], outputs[0]) <= 1e-5


def test_unfuse_restores_exact_tensors_processors_and_key_order():
    for dtype in (torch.float32, torch.bfloat16):
        reference = tiny_qwen21().to(dtype)
        reference.transformer_blocks[1].attn.set_processor(QwenImage21FlexAttnProcessor())
        merged = fuse_projections(copy.deepcopy(reference))
        assert fuse_projections(merged) is merged  # no-op when merged
        restored = unfuse_projections(merged)
        expected, actual = reference.state_dict(), restored.state_dict()
        assert list(actual) == list(expected)
        for key, tensor in expected.items():
            assert torch.equal(actual[key], tensor), key
        assert [type(b.attn.processor) for b in restored.transformer_blocks] == [
            QwenImage21AttnProcessor,
            QwenImage21FlexAttnProcessor,
        ]
        assert not is_merged(unfuse_projections(restored))


def test_fuse_keeps_requires_grad_and_layerwise_casting():
    reference, merged = tiny_qwen21(), tiny_qwen21()  # a deepcopy would break diffusers' hooks
    for model in (reference, merged):
        model.requires_grad_(False).enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
    fuse_projections(merged)
    block = merged.transformer_blocks[0]
    assert block.attn.to_qkv.weight.dtype == torch.bfloat16 == block.img_mlp.gate_up_proj.weight.dtype
    assert not any(parameter.requires_grad for parameter in merged.parameters())
    inputs = make_inputs(1)
    with torch.no_grad():
        assert relative_error(merged(**inputs).sample, reference(**inputs).sample) <= 1e-5


def test_fusing_refuses_lora_layers_and_unknown_processors(reference_model):
    from peft import LoraConfig, inject_adapter_in_model

    model = copy.deepcopy(reference_model)
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["gate_layer"]), model)
    with pytest.raises(TypeError, match=r"img_mlp\.gate_layer is a .*not a plain nn\.Linear"):
        fuse_projections(model)
    assert not is_merged(model)  # nothing changed, not even the attention of block 0

    class OwnProcessor(QwenImage21AttnProcessor):
        pass

    model = copy.deepcopy(reference_model)
    model.transformer_blocks[1].attn.set_processor(OwnProcessor())
    with pytest.raises(TypeError, match="transformer_blocks.1.attn has processor OwnProcessor"):
        fuse_projections(model)
    assert not hasattr(model.transformer_blocks[0].attn, "to_qkv")


PROJECTIONS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_qkv", "img_mlp.gate_layer", "img_mlp.proj")


def projection_weights(model):
    # A merged model keeps a parameterless MergedPart under each standard name (fusedit.model.diffusers_api).
    modules = [
        block.get_submodule(name.split(".")[0])._modules.get(name.split(".")[1])
        for block in model.transformer_blocks
        for name in (*PROJECTIONS, "img_mlp.gate_up_proj")
    ]
    return [module.weight for module in modules if isinstance(module, torch.nn.Linear)]


@pytest.mark.parametrize("layers", [1, 2])
def test_projections_issue_two_gemms_per_block_instead_of_five(reference_model, layers):
    reference = copy.deepcopy(reference_model)
    reference.transformer_blocks = reference.transformer_blocks[:layers]
    merged = fuse_projections(copy.deepcopy(reference))
    counters = []
    for model in (reference, merged):
        counter = ProjectionGemmCounter(projection_weights(model))
        with torch.no_grad(), counter:
            model(**make_inputs(1))
        counters.append(counter)
    standard, fused = counters
    assert standard.calls == 5 * layers
    assert fused.calls == 2 * layers
    assert standard.all_gemms - fused.all_gemms == 3 * layers  # every other GEMM is still there


def test_fusedit_fuse_qkv_hands_a_qwen21_model_to_its_merged_layout(reference_model):
    from fusedit.model import fuse_qkv, unfuse_qkv
    from fusedit.model import is_merged as is_merged_any

    model = fuse_qkv(copy.deepcopy(reference_model))
    assert is_merged_any(model) and hasattr(model.transformer_blocks[0].img_mlp, "gate_up_proj")
    assert type(model.transformer_blocks[0].attn.processor) is MergedQwenImage21AttnProcessor
    unfuse_qkv(model)
    assert not is_merged_any(model)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference_model.state_dict().values()))
