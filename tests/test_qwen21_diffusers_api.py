"""The merged Qwen-Image-2.1 model reached through PEFT's and diffusers' own adapter API (fusedit.model.diffusers_api,
shared with the MMDiT): standard target names translate or are refused, never a silent subset; checked against
diffusers' own unfused 2.1 model carrying the same LoRA (fp32 rel <= 1e-5)."""

import copy

import peft
import pytest
import torch
from peft import LoraConfig

from fusedit.model.diffusers_api import MergedPart
from fusedit.model.merged_qwen21 import fuse_projections, unfuse_projections
from tests.test_qwen21_merged import forward_and_input_grads, make_inputs, relative_error, tiny_qwen21

MERGED_HELP = r"to_qkv \(= to_q \+ to_k \+ to_v\), img_mlp\.gate_up_proj \(= img_mlp\.gate_layer \+ img_mlp\.proj\)"
BLOCKS = (0, 1)


@pytest.fixture(scope="module")
def reference_model():
    return tiny_qwen21()


def adapted_modules(model) -> set[str]:
    return {name.removesuffix(".lora_A") for name, _ in model.named_modules() if name.endswith(".lora_A")}


@pytest.mark.parametrize(
    ("inject", "targets", "merged_name"),
    [
        ("inject_adapter_in_model", ["to_q", "to_k", "to_v"], "to_qkv"),
        ("get_peft_model", ["gate_layer", "proj"], "gate_up_proj"),
        ("inject_adapter_in_model", ["img_mlp.proj"], "gate_up_proj"),
    ],
    ids=["qkv", "gate-up", "up"],
)
def test_peft_own_injection_refuses_standard_names_naming_the_merged_module(
    reference_model, inject, targets, merged_name
):
    merged = fuse_projections(copy.deepcopy(reference_model))
    config = LoraConfig(r=2, target_modules=targets)
    call = (
        peft.inject_adapter_in_model if inject == "inject_adapter_in_model" else lambda c, m: peft.get_peft_model(m, c)
    )
    with pytest.raises(ValueError, match=rf"is merged into {merged_name} \(fusedit.fuse_qkv\): target {merged_name}"):
        call(config, merged)
    assert not adapted_modules(merged)
    # the merged names are what PEFT takes
    adapted = peft.inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_qkv", "img_mlp.gate_up_proj"]), merged)
    assert adapted_modules(adapted) == {
        f"transformer_blocks.{b}.{n}" for b in BLOCKS for n in ("attn.to_qkv", "img_mlp.gate_up_proj")
    }


def test_the_guard_is_parameterless_and_unfuse_removes_it(reference_model):
    merged = fuse_projections(copy.deepcopy(reference_model))
    block = merged.transformer_blocks[0]
    guards = [name for name, module in block.named_modules() if isinstance(module, MergedPart)]
    assert guards == ["attn.to_q", "attn.to_k", "attn.to_v", "img_mlp.gate_layer", "img_mlp.proj"]
    # No parameters, buffers or state-dict entries (the forward is the equivalence tests' in test_qwen21_merged.py,
    # which run with the guard in place).
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in reference_model.parameters())
    assert not any(".to_q." in key or ".gate_layer." in key for key in merged.state_dict())
    restored = unfuse_projections(merged)
    assert not any(isinstance(module, MergedPart) for module in restored.modules())
    assert type(restored.transformer_blocks[0].img_mlp.proj) is torch.nn.Linear
    assert "add_adapter" not in vars(restored)  # the class's own method again


def _copy_merged_lora_into_parts(merged, standard) -> None:
    """`standard` gets the LoRA that `merged` carries: a merged adapter's A is each part's A, its B the parts' Bs
    stacked in the merged weight's order (fusedit.model.module_map)."""
    groups = {"attn": ("to_qkv", ("to_q", "to_k", "to_v")), "img_mlp": ("gate_up_proj", ("gate_layer", "proj"))}
    with torch.no_grad():
        for merged_block, block in zip(merged.transformer_blocks, standard.transformer_blocks, strict=True):
            for parent, (merged_name, parts) in groups.items():
                source = getattr(getattr(merged_block, parent), merged_name)
                b_parts = source.lora_B["default"].weight.chunk(len(parts), dim=0)
                for part, b_part in zip(parts, b_parts, strict=True):
                    target = getattr(getattr(block, parent), part)
                    target.lora_A["default"].weight.copy_(source.lora_A["default"].weight)
                    target.lora_B["default"].weight.copy_(b_part)
            block.attn.to_out[0].load_state_dict(merged_block.attn.to_out[0].state_dict())


def test_add_adapter_translates_standard_names_and_matches_diffusers_unfused_model(reference_model):
    targets = ["to_q", "to_k", "to_v", "gate_layer", "proj", "to_out.0"]
    merged = fuse_projections(copy.deepcopy(reference_model))
    torch.manual_seed(0)
    merged.add_adapter(LoraConfig(r=2, lora_alpha=3, target_modules=targets, init_lora_weights=False))
    assert adapted_modules(merged) == {
        f"transformer_blocks.{b}.{n}" for b in BLOCKS for n in ("attn.to_qkv", "attn.to_out.0", "img_mlp.gate_up_proj")
    }
    standard = copy.deepcopy(reference_model)
    standard.add_adapter(LoraConfig(r=2, lora_alpha=3, target_modules=targets, init_lora_weights=False))
    _copy_merged_lora_into_parts(merged, standard)
    assert merged.transformer_blocks[1].img_mlp.gate_up_proj.lora_B["default"].weight.abs().min() > 0  # B not zero
    inputs = make_inputs(2)
    expected, actual = forward_and_input_grads(standard, inputs), forward_and_input_grads(merged, inputs)
    for merged_value, reference_value in zip(actual, expected, strict=True):
        assert relative_error(merged_value, reference_value) <= 1e-5
    # the merged adapter's B gradient is the parts' B gradients, stacked
    block, merged_block = standard.transformer_blocks[0], merged.transformer_blocks[0]
    parts_grad = torch.cat(
        [block.img_mlp.gate_layer.lora_B["default"].weight.grad, block.img_mlp.proj.lora_B["default"].weight.grad]
    )
    assert relative_error(merged_block.img_mlp.gate_up_proj.lora_B["default"].weight.grad, parts_grad) <= 1e-5


@pytest.mark.parametrize(
    "config",
    [
        {"target_modules": ["to_q"]},
        {"target_modules": ["gate_layer", "to_out.0"]},
        {"target_modules": ["img_mlp.gate_layer", "proj"]},  # two leading paths: two partial groups
        {"target_modules": r".*img_mlp\.(proj|out)"},
        {"target_modules": ["img_mlp.gate_up_proj"], "rank_pattern": {"proj": 4}},
    ],
    ids=["one-part", "gate-only", "mixed-paths", "regex", "rank-pattern"],
)
def test_add_adapter_refuses_partial_groups_naming_the_merged_modules(reference_model, config):
    merged = fuse_projections(copy.deepcopy(reference_model))
    with pytest.raises(ValueError, match=rf"this transformer is merged.*{MERGED_HELP}"):
        merged.add_adapter(LoraConfig(r=2, **config))
    assert not adapted_modules(merged)  # refused before PEFT touched anything
