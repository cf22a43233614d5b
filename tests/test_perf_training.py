"""The perf switches wired into training: prompt-padding trim, attention backend, checkpoint offload, float8
compute stage, and LoRA inputs that follow autocast instead of round-tripping through fp32."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from fusedit.lora.adapter import lora_inputs_follow_autocast
from fusedit.model import checkpointing, fp8
from fusedit.model.attention import sdpa_backends
from fusedit.model.fp8 import Float8ComputeLinear
from fusedit.step import build
from fusedit.step import loss as loss_lib
from fusedit.step.build import build_transformer, stages_applied
from fusedit.step.conditioning import EditInputs
from fusedit.step.config import LoraSpec, ModelConfig
from fusedit.step.objective import FlowMatchObjective
from fusedit.step.precision import Precision
from fusedit.training.module import EditLoRAModule
from tests.training_utils import compose_train

LORA = LoraSpec("attn_mlp", rank=4, alpha=8)


def tiny_inputs(lengths=(7, 5), extra_padding=3, seed=0) -> EditInputs:
    """Two samples whose prompts have different lengths, padded past the longer one (as a fixed-length encoder
    would): the trim must cut the shared padding and keep the mask for the shorter prompt."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths) + extra_padding
    embeds = torch.randn(2, width, 32, generator=generator)
    mask = torch.stack([torch.arange(width) < length for length in lengths]).long()
    embeds = embeds * mask[..., None]
    return EditInputs(
        target=torch.randn(2, 4, 64, generator=generator),
        condition=torch.randn(2, 4, 64, generator=generator),
        prompt_embeds=embeds,
        prompt_mask=mask,
        img_shapes=[[(1, 2, 2), (1, 2, 2)]] * 2,
    )


def make_module(path, attention="auto", **model_fields) -> EditLoRAModule:
    torch.manual_seed(0)
    transformer = build_transformer(path, ModelConfig(**model_fields), LORA, Precision())
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.2)
    return EditLoRAModule(
        transformer, torch.nn.Module(), FlowMatchObjective(), functools.partial(torch.optim.AdamW), attention=attention
    )


def test_trimmed_prompt_padding_gives_the_masked_loss(tiny_edit_path, monkeypatch):
    module = make_module(tiny_edit_path)
    inputs = tiny_inputs()
    seen = []
    original_forward = module.transformer.forward

    def spy(*args, **kwargs):
        seen.append((kwargs["encoder_hidden_states"].shape[1], kwargs["encoder_hidden_states_mask"]))
        return original_forward(*args, **kwargs)

    monkeypatch.setattr(module.transformer, "forward", spy)
    trimmed = module.compute_loss(inputs, seed=3)[0]
    assert seen[-1][0] == 7 and seen[-1][1] is not None  # shared padding cut, the shorter prompt still masked
    with monkeypatch.context() as patch:
        patch.setattr(loss_lib, "trim_prompt_padding", lambda embeds, mask: (embeds, mask))
        masked = module.compute_loss(inputs, seed=3)[0]
    assert seen[-1][0] == 10
    assert trimmed.item() == pytest.approx(masked.item(), rel=1e-5)

    equal = tiny_inputs(lengths=(6, 6))
    module.compute_loss(equal, seed=3)
    assert seen[-1] == (6, None)  # nothing left padded: no mask, SDPA may use its fused kernels


def test_attention_backend_is_applied_and_checked(tiny_edit_path):
    with pytest.raises(ValueError, match="model.attention must be one of"):
        make_module(tiny_edit_path, attention="flash2")
    inputs = tiny_inputs(lengths=(6, 6))
    losses, backends = {}, {}
    for name in ("auto", "math"):
        module = make_module(tiny_edit_path, attention=name)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            losses[name] = module.compute_loss(inputs, seed=1)[0].item()
        backends[name] = sdpa_backends(event.name for event in prof.events())
    assert backends == {"auto": ["flash_cpu"], "math": ["math"]}
    assert losses["math"] == pytest.approx(losses["auto"], rel=1e-5)
    assert compose_train(["model.attention=cudnn"]).model.attention == "cudnn"


@pytest.mark.parametrize("every", [1, 2])
def test_checkpoint_offload_gives_the_same_gradients(tiny_edit_path, every):
    inputs = tiny_inputs()
    grads = []
    for offload in (False, True):
        module = make_module(tiny_edit_path, activation_checkpointing=every, checkpoint_offload=offload)
        module.compute_loss(inputs, seed=2)[0].backward()
        grads.append({name: p.grad.clone() for name, p in module.trainable_parameters().items()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)
    with pytest.raises(ValueError, match="checkpoint_offload=true needs model.activation_checkpointing"):
        ModelConfig(checkpoint_offload=True)


def test_checkpoint_offload_moves_saved_inputs_to_cpu(tiny_edit_path, monkeypatch):
    calls = []
    original = checkpointing.offloaded_checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(checkpointing, "offloaded_checkpoint", counting)
    module = make_module(tiny_edit_path, activation_checkpointing=1, checkpoint_offload=True)
    module.compute_loss(tiny_inputs(), seed=2)[0].backward()
    assert len(calls) == len(module.transformer.transformer_blocks)


def test_fp8_compute_is_refused_off_sm89_with_a_clear_error(tiny_edit_path):
    if fp8.float8_compute_support("cuda" if torch.cuda.is_available() else "cpu")[0]:
        pytest.skip("this machine supports float8 GEMMs")
    with pytest.raises(RuntimeError, match=r"precision.fp8=float8: float8 GEMMs need .*fp8=storage"):
        build_transformer(tiny_edit_path, ModelConfig(), LORA, Precision(fp8="float8"))
    cfg = compose_train(["precision=fp8", "precision.fp8=float8"])
    assert cfg.precision.fp8 == "float8"


def test_fp8_compute_is_the_fp8_stage_before_lora(tiny_edit_path, monkeypatch):
    # The stage wiring on CPU, where PyTorch emulates _scaled_mm: only the device check is bypassed.
    monkeypatch.setattr(fp8, "float8_compute_support", lambda device: (True, "ok"))
    model = build_transformer(tiny_edit_path, ModelConfig(), LORA, Precision(fp8="float8"), device="cpu")
    assert stages_applied(model) == ["load", "fuse", "fp8", "lora"]
    block = model.transformer_blocks[0]
    assert isinstance(block.attn.to_qkv.base_layer, Float8ComputeLinear)
    assert block.attn.to_qkv.lora_A["default"].weight.dtype == torch.float32
    module = EditLoRAModule(model, torch.nn.Module(), FlowMatchObjective(), functools.partial(torch.optim.AdamW))
    loss = module.compute_loss(tiny_inputs(), seed=0)[0]
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in module.trainable_parameters().values())

    late = build.lora(build.load(tiny_edit_path, "merged_qkv"), **dataclasses.asdict(LORA))
    with pytest.raises(RuntimeError, match="must run before"):
        build.float8_compute(late, device="cpu")


def test_lora_inputs_skip_the_fp32_round_trip_under_autocast(tiny_edit_path):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Fp32Copies(TorchDispatchMode):
        elements = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default and out.dtype == torch.float32 and args[0].requires_grad:
                type(self).elements += out.numel()
            return out

    inputs = tiny_inputs(lengths=(6, 6))
    hidden = torch.cat([inputs.target, inputs.condition], 1).bfloat16()
    kwargs = dict(
        hidden_states=hidden,
        timestep=torch.tensor([0.5, 0.5]),
        encoder_hidden_states=inputs.prompt_embeds.bfloat16(),
        img_shapes=inputs.img_shapes,
        return_dict=False,
    )
    outputs, copies = {}, {}
    for follow in (False, True):
        torch.manual_seed(0)
        model = build_transformer(tiny_edit_path, ModelConfig(), LORA, Precision(base_dtype="bfloat16"))
        if not follow:  # undo the build stage's patch: PEFT's own cast
            for module in model.modules():
                module.__dict__.pop("_cast_input_dtype", None)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.2)
        Fp32Copies.elements = 0
        with torch.autocast("cpu", dtype=torch.bfloat16), Fp32Copies():
            outputs[follow] = model(**kwargs)[0]
        copies[follow] = Fp32Copies.elements
        no_autocast = model(**kwargs)[0]  # without autocast the cast is still there: fp32 LoRA on bf16 input works
        assert no_autocast.dtype == torch.bfloat16
    torch.testing.assert_close(outputs[True], outputs[False], rtol=0, atol=0)
    assert copies[False] > 0 and copies[True] < copies[False]
    assert lora_inputs_follow_autocast(torch.nn.Linear(2, 2)) == 0
