"""The merged-QKV model is diffusers' model, computed with fewer GEMMs: equal outputs, equal gradients, exact unfuse."""

import copy

import pytest
import torch
from diffusers import QwenImageTransformer2DModel
from torch.utils._python_dispatch import TorchDispatchMode

from fusedit.model import fuse_qkv, is_merged, load_transformer, unfuse_qkv

HEAD_DIM = 16

# Variant -> (model kwargs, img_shapes per sample). Edit variants append edit-image latents along the sequence;
# diffusers gives them RoPE frame index 1..n. Edit-2511 adds zero_cond_t (per-token modulation index).
VARIANTS = {
    "t2i": ({}, [(1, 4, 6)]),
    "edit": ({}, [(1, 4, 6), (1, 4, 6)]),
    "edit-2509": ({}, [(1, 4, 6), (1, 4, 4), (1, 6, 4)]),
    "edit-2511": ({"zero_cond_t": True}, [(1, 4, 6), (1, 4, 4), (1, 6, 4)]),
}


def tiny_transformer(seed=0, **kwargs):
    torch.manual_seed(seed)
    model = QwenImageTransformer2DModel(
        num_layers=2,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=3,
        joint_attention_dim=40,
        axes_dims_rope=(4, 6, 6),
        **kwargs,
    )
    # diffusers zero-initialises nothing here, but make sure no weight is trivially zero (e.g. proj_out).
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.2)
    return model.eval()


def make_inputs(shapes, batch=2, text_len=9, dtype=torch.float32, seed=1, padded=True):
    generator = torch.Generator().manual_seed(seed)
    tokens = sum(f * h * w for f, h, w in shapes)
    mask = torch.ones(batch, text_len)
    if padded:
        mask[1, text_len - 3 :] = 0  # a padded prompt in the batch exercises the joint attention mask
    return {
        "hidden_states": torch.randn(batch, tokens, 64, generator=generator, dtype=dtype),
        "encoder_hidden_states": torch.randn(batch, text_len, 40, generator=generator, dtype=dtype),
        "encoder_hidden_states_mask": mask,
        "timestep": torch.rand(batch, generator=generator).to(dtype),
        "img_shapes": [shapes] * batch,
    }


def relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_forward_and_input_gradients_match_diffusers(variant, checkpointing):
    kwargs, shapes = VARIANTS[variant]
    reference = tiny_transformer(**kwargs)
    merged = fuse_qkv(copy.deepcopy(reference))
    assert is_merged(merged) and not is_merged(reference)
    if checkpointing:
        reference.enable_gradient_checkpointing()
        merged.enable_gradient_checkpointing()

    outputs, grads = [], []
    for model in (reference, merged):
        inputs = make_inputs(shapes)
        inputs["hidden_states"].requires_grad_(True)
        inputs["encoder_hidden_states"].requires_grad_(True)
        out = model(**inputs).sample
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        outputs.append(out.detach())
        grads.append((inputs["hidden_states"].grad, inputs["encoder_hidden_states"].grad))

    assert outputs[0].abs().max() > 0.1  # a real signal, not a vanishing output
    assert relative_error(outputs[1], outputs[0]) <= 1e-5
    for merged_grad, reference_grad in zip(grads[1], grads[0], strict=True):
        assert relative_error(merged_grad, reference_grad) <= 1e-5


def test_each_block_matches_diffusers():
    reference = tiny_transformer()
    merged = fuse_qkv(copy.deepcopy(reference))
    inputs = make_inputs(VARIANTS["edit"][1])
    captured = {}

    def capture(name):
        def hook(module, args, kwargs, output):
            captured.setdefault(name, []).append(output)

        return hook

    for name, model in (("reference", reference), ("merged", merged)):
        handles = [block.register_forward_hook(capture(name), with_kwargs=True) for block in model.transformer_blocks]
        with torch.no_grad():
            model(**inputs)
        for handle in handles:
            handle.remove()

    assert len(captured["merged"]) == len(reference.transformer_blocks)
    for (ref_txt, ref_img), (txt, img) in zip(captured["reference"], captured["merged"], strict=True):
        assert relative_error(img, ref_img) <= 1e-5
        assert relative_error(txt, ref_txt) <= 1e-5


def test_bf16_stays_within_bf16_noise():
    reference = tiny_transformer()
    merged = fuse_qkv(copy.deepcopy(reference)).to(torch.bfloat16)
    inputs = make_inputs(VARIANTS["edit"][1])
    with torch.no_grad():
        exact = reference(**inputs).sample
        bf16_reference = (
            copy.deepcopy(reference).to(torch.bfloat16)(**make_inputs(VARIANTS["edit"][1], dtype=torch.bfloat16)).sample
        )
        bf16_merged = merged(**make_inputs(VARIANTS["edit"][1], dtype=torch.bfloat16)).sample
    # The merged model in bf16 is as far from the fp32 truth as diffusers' own bf16 model is (bf16 eps = 2^-8).
    reference_noise = relative_error(bf16_reference.float(), exact)
    merged_noise = relative_error(bf16_merged.float(), exact)
    assert merged_noise <= max(2 * reference_noise, 2**-6)


def test_unfuse_restores_exact_tensors_in_every_dtype():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        reference = tiny_transformer().to(dtype)
        restored = unfuse_qkv(fuse_qkv(copy.deepcopy(reference)))
        expected, actual = reference.state_dict(), restored.state_dict()
        assert list(actual) == list(expected) or set(actual) == set(expected)
        for key, tensor in expected.items():
            assert torch.equal(actual[key], tensor), key


def test_fuse_and_unfuse_are_idempotent_and_keep_requires_grad():
    model = tiny_transformer().requires_grad_(False)
    fuse_qkv(model)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    fuse_qkv(model)  # a no-op on a merged model
    assert all(torch.equal(state[key], value) for key, value in model.state_dict().items())
    assert not any(parameter.requires_grad for parameter in model.parameters())
    unfuse_qkv(model)
    unfuse_qkv(model)
    assert not is_merged(model)


def test_fusing_a_model_with_lora_layers_is_refused():
    from peft import LoraConfig, inject_adapter_in_model

    model = tiny_transformer()
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_q", "to_k", "to_v"]), model)
    with pytest.raises(TypeError, match=r"not a plain nn\.Linear"):
        fuse_qkv(model)


class ProjectionGemmCounter(TorchDispatchMode):
    """Counts ATen GEMM calls whose operand is one of the given weights (a transposed weight shares its storage)."""

    GEMMS = frozenset(
        {"aten.addmm.default", "aten.mm.default", "aten.bmm.default", "aten.linear.default", "aten.matmul.default"}
    )

    def __init__(self, weights):
        super().__init__()
        self.pointers = {weight.untyped_storage().data_ptr() for weight in weights}
        self.calls = 0
        self.all_gemms = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in self.GEMMS:
            self.all_gemms += 1
            operands = [arg for arg in args if isinstance(arg, torch.Tensor)]
            if any(operand.untyped_storage().data_ptr() in self.pointers for operand in operands):
                self.calls += 1
        return func(*args, **(kwargs or {}))


def qkv_projection_weights(model):
    names = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_qkv", "add_qkv_proj")
    return [
        getattr(block.attn, name).weight
        for block in model.transformer_blocks
        for name in names
        if isinstance(getattr(block.attn, name, None), torch.nn.Linear)  # a merged model's to_q is a MergedPart
    ]


def count_gemms(model):
    counter = ProjectionGemmCounter(qkv_projection_weights(model))
    with torch.no_grad(), counter:
        model(**make_inputs(VARIANTS["edit"][1]))
    return counter


@pytest.mark.parametrize("layers", [1, 2])
def test_qkv_projections_issue_two_gemms_per_block_instead_of_six(layers):
    reference = tiny_transformer()
    reference.transformer_blocks = reference.transformer_blocks[:layers]
    merged = fuse_qkv(copy.deepcopy(reference))
    standard, fused = count_gemms(reference), count_gemms(merged)
    assert standard.calls == 6 * layers
    assert fused.calls == 2 * layers
    # Nothing else changed: every other GEMM of the forward is still there.
    assert standard.all_gemms - fused.all_gemms == 4 * layers


def test_load_transformer_reads_every_checkpoint_kind(tmp_path):
    from safetensors.torch import save_file

    reference = tiny_transformer()
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="30KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2

    merged = load_transformer(tmp_path / "sharded", "merged_qkv")
    assert is_merged(merged)
    merged.save_pretrained(tmp_path / "merged")
    standard_again = load_transformer(tmp_path / "merged", "standard")
    for key, tensor in reference.state_dict().items():
        assert torch.equal(standard_again.state_dict()[key], tensor), key

    single = {f"model.diffusion_model.{key}": value.contiguous() for key, value in merged.state_dict().items()}
    save_file(single, tmp_path / "single.safetensors", metadata={"attention_head_dim": str(HEAD_DIM)})
    from_single = load_transformer(tmp_path / "single.safetensors", "merged_qkv", dtype=torch.bfloat16)
    assert from_single.dtype == torch.bfloat16
    for key, tensor in merged.state_dict().items():
        assert torch.equal(from_single.state_dict()[key], tensor.bfloat16()), key


def test_load_transformer_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_transformer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no safetensors"):
        load_transformer(tmp_path / "empty")
    from safetensors.torch import save_file

    save_file({"foo.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="no Qwen-Image attention"):
        load_transformer(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="layout must be one of"):
        load_transformer(tmp_path / "other.safetensors", layout="fused")
