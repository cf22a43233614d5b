"""The merged model reached through diffusers' and PEFT's own API (fusedit.model.diffusers_api), against diffusers'
real classes: save_pretrained, add_adapter / load_lora_adapter target names, attention processors, tensor-parallel
plan, float8 layerwise casting. Equivalence is always against diffusers' own unmerged model (fp32 rel <= 1e-5)."""

import copy
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import QwenImageTransformer2DModel
from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from fusedit.model import MergedQKVAttnProcessor, fuse_qkv, is_merged, load_transformer, unfuse_qkv
from fusedit.model.fp8 import apply_fp8_storage
from tests.test_merged_qkv import VARIANTS, make_inputs, relative_error, tiny_transformer

REPO = Path(__file__).resolve().parents[1]
SHAPES = VARIANTS["edit"][1]


def forward(model, **overrides):
    with torch.no_grad():
        return model(**make_inputs(SHAPES, **overrides)).sample


def adapted_modules(model) -> set[str]:
    return {name.removesuffix(".lora_A") for name, _ in model.named_modules() if name.endswith(".lora_A")}


# ------------------------------------------------------------------------------------------- save_pretrained
@pytest.mark.parametrize("low_cpu_mem_usage", [True, False])
def test_save_pretrained_writes_the_standard_layout_stock_diffusers_loads(tmp_path, low_cpu_mem_usage):
    reference = tiny_transformer()
    merged = fuse_qkv(copy.deepcopy(reference))
    merged.save_pretrained(tmp_path / "t", max_shard_size="40KB")
    assert len(list((tmp_path / "t").glob("*.safetensors"))) > 2

    stock = QwenImageTransformer2DModel.from_pretrained(tmp_path / "t", low_cpu_mem_usage=low_cpu_mem_usage)
    assert not is_merged(stock)
    for key, tensor in reference.state_dict().items():
        assert torch.equal(stock.state_dict()[key], tensor), key  # split exactly, nothing random
    assert relative_error(forward(stock), forward(reference)) == 0.0

    # The merged model itself is unchanged (the split is a save-time hook), and fusedit reads the save both ways.
    assert "transformer_blocks.0.attn.to_qkv.weight" in merged.state_dict()
    assert relative_error(forward(load_transformer(tmp_path / "t")), forward(reference)) <= 1e-5


def test_save_pretrained_survives_deepcopy_and_unfuse(tmp_path):
    merged = fuse_qkv(tiny_transformer())
    copy.deepcopy(merged).save_pretrained(tmp_path / "copy")
    # pickled too (DDP spawn, torch.save of a module): the copy's save_pretrained is bound to the copy
    unpickled = pickle.loads(pickle.dumps(merged))
    assert unpickled.save_pretrained.args[0] is unpickled
    assert unpickled.transformer_blocks[0].attn.set_processor.args[0] is unpickled.transformer_blocks[0].attn
    keys = load_file(tmp_path / "copy" / "diffusion_pytorch_model.safetensors")
    assert "transformer_blocks.0.attn.to_q.weight" in keys and not any("qkv" in key for key in keys)
    unfuse_qkv(merged)
    assert "save_pretrained" not in vars(merged)  # the class's own method again
    merged.save_pretrained(tmp_path / "unfused")
    assert set(load_file(tmp_path / "unfused" / "diffusion_pytorch_model.safetensors")) == set(keys)


def test_save_pretrained_refuses_what_has_no_standard_equivalent(tmp_path):
    merged = fuse_qkv(tiny_transformer())
    merged.add_adapter(LoraConfig(r=2, target_modules=["to_qkv"]))
    with pytest.raises(ValueError, match=r"to_qkv\.base_layer\.weight .*export_lora.*unfuse_qkv"):
        merged.save_pretrained(tmp_path / "t")


# ------------------------------------------------------------------------------------------------ LoRA targets
def test_add_adapter_translates_whole_qkv_groups():
    merged = fuse_qkv(tiny_transformer())
    reference_out = forward(merged)
    merged.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    assert adapted_modules(merged) == {
        f"transformer_blocks.{block}.attn.{name}" for block in (0, 1) for name in ("to_qkv", "to_out.0")
    }
    assert relative_error(forward(merged), reference_out) == 0.0  # LoRA B starts at zero

    dotted = fuse_qkv(tiny_transformer())
    dotted.add_adapter(LoraConfig(r=4, target_modules=["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]))
    assert adapted_modules(dotted) == {f"transformer_blocks.{block}.attn.add_qkv_proj" for block in (0, 1)}


@pytest.mark.parametrize(
    "config",
    [
        {"target_modules": ["to_q"]},
        {"target_modules": ["to_q", "to_k", "add_v_proj", "to_out.0"]},
        {"target_modules": r".*attn\.to_(q|out\.0)"},
        {"target_modules": ["to_qkv"], "rank_pattern": {"to_q": 8}},
        {"target_modules": ["to_qkv", "to_out.0"], "exclude_modules": ["transformer_blocks.1.attn.to_k"]},
    ],
    ids=["one-part", "partial-groups", "regex", "rank-pattern", "exclude"],
)
def test_add_adapter_refuses_partial_qkv_names_naming_the_merged_ones(config):
    merged = fuse_qkv(tiny_transformer())
    with pytest.raises(ValueError, match=r"this transformer is merged.*to_qkv \(= to_q \+ to_k \+ to_v\)"):
        merged.add_adapter(LoraConfig(r=4, **config))
    assert not adapted_modules(merged)  # refused before PEFT touched anything


@pytest.mark.parametrize("inject", ["inject_adapter_in_model", "get_peft_model"])
@pytest.mark.parametrize(
    "targets",
    [["to_q", "to_k", "to_v"], ["to_q"], ["to_q", "to_k", "to_v", "to_out.0"], ["attn.add_k_proj", "to_out.0"]],
    ids=["qkv", "q", "qkv-out", "add_k-out"],
)
def test_peft_own_injection_refuses_standard_names_instead_of_adapting_a_subset(inject, targets):
    """PEFT called directly (not through add_adapter) matches names without asking the model: the q/k/v names
    resolve to a MergedPart that PEFT refuses, naming the merged projection, before it adapts that block."""
    import peft

    merged = fuse_qkv(tiny_transformer())
    config = LoraConfig(r=4, target_modules=targets)
    call = (
        peft.inject_adapter_in_model if inject == "inject_adapter_in_model" else lambda c, m: peft.get_peft_model(m, c)
    )
    merged_name = "add_qkv_proj" if "add_k" in targets[0] else "to_qkv"
    with pytest.raises(ValueError, match=rf"is merged into {merged_name} \(fusedit.fuse_qkv\): target {merged_name}"):
        call(config, merged)
    assert not adapted_modules(merged)
    # the merged names still work there, and the placeholders change nothing else
    out = forward(merged)
    assert not any(".to_q." in key or ".add_q_proj." in key for key in merged.state_dict())
    adapted = peft.inject_adapter_in_model(LoraConfig(r=4, target_modules=["to_qkv", "to_out.0"]), merged)
    assert adapted_modules(adapted) == {
        f"transformer_blocks.{b}.attn.{n}" for b in (0, 1) for n in ("to_qkv", "to_out.0")
    }
    assert relative_error(forward(adapted), out) == 0.0


def test_unfuse_removes_the_merged_parts():
    from fusedit.model.diffusers_api import MergedPart

    model = unfuse_qkv(fuse_qkv(tiny_transformer()))
    assert not any(isinstance(module, MergedPart) for module in model.modules())
    assert type(model.transformer_blocks[0].attn.to_q) is torch.nn.Linear


def standard_lora(alpha=5):
    """A standard-layout LoRA made by PEFT on diffusers' model: (`transformer.`-prefixed state dict, LoraConfig)."""
    targets = ["to_q", "to_k", "to_v", "add_k_proj", "to_out.0"]  # add_q/v_proj left out: a partial group
    config = LoraConfig(r=2, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    standard = tiny_transformer(seed=3)
    standard.add_adapter(config)
    lora = {f"transformer.{key}": value for key, value in get_peft_model_state_dict(standard).items()}
    # diffusers keys the metadata (LoraConfig kwargs) like the tensors, and strips the prefix with them
    return lora, {f"transformer.{key}": value for key, value in config.to_dict().items()}


def test_load_lora_adapter_converts_a_standard_lora_exactly(tmp_path):
    lora, metadata = standard_lora()
    # diffusers' file format: the LoraConfig as JSON under `lora_adapter_metadata` (diffusers reads it, not `metadata=`)
    save_file(
        lora,
        tmp_path / "standard.safetensors",
        metadata={"lora_adapter_metadata": json.dumps(metadata, default=sorted)},
    )
    for source in (lora, str(tmp_path / "standard.safetensors")):
        expected = tiny_transformer()
        expected.load_lora_adapter(source, prefix="transformer", metadata=metadata, adapter_name="std")
        merged = fuse_qkv(tiny_transformer())
        merged.load_lora_adapter(source, prefix="transformer", metadata=metadata, adapter_name="std")
        assert adapted_modules(merged) == {
            f"transformer_blocks.{block}.attn.{name}"
            for block in (0, 1)
            for name in ("to_qkv", "add_qkv_proj", "to_out.0")
        }
        for model in (expected, merged):
            model.set_adapters(["std"], weights=[0.7])
        # strength kept: diffusers' alpha / rank on every module (the dict's config: 5 / 2; r_q + r_k + r_v = 6 and
        # alpha 15 on to_qkv), times 0.7
        scalings = [module.scaling["std"] for name, module in merged.named_modules() if name.endswith("to_qkv")]
        stock_scaling = expected.transformer_blocks[0].attn.to_q.scaling["std"]
        assert scalings == pytest.approx([stock_scaling] * 2, rel=1e-12)
        assert stock_scaling == 1.75 or isinstance(source, str)  # diffusers reads no config from a bare file path
        assert relative_error(forward(merged), forward(expected)) <= 1e-5

    # A LoRA without q/k/v modules goes to diffusers untouched.
    merged = fuse_qkv(tiny_transformer())
    only_out = {key: value for key, value in lora.items() if ".to_out." in key}
    merged.load_lora_adapter(only_out, prefix="transformer", adapter_name="out")
    assert adapted_modules(merged) == {f"transformer_blocks.{block}.attn.to_out.0" for block in (0, 1)}


def test_load_lora_adapter_refuses_what_it_cannot_convert():
    lora, _ = standard_lora()
    merged = fuse_qkv(tiny_transformer())
    with pytest.raises(ValueError, match=r"this LoRA names separate projections .*add_k_proj.*network_alphas"):
        merged.load_lora_adapter(lora, prefix="transformer", network_alphas={"x": 1.0})
    rank_clash = {"transformer.r": 4, "transformer.lora_alpha": 4}  # contradicts the tensors' rank 2
    with pytest.raises(ValueError, match=r"cannot be converted to the merged layout \(LoRA: .* rank 2"):
        merged.load_lora_adapter(lora, prefix="transformer", metadata=rank_clash)
    assert not adapted_modules(merged)


# ------------------------------------------------------------------------------------------ attention processors
def test_set_attn_processor_refuses_stock_processors_and_unfuse_restores_them():
    reference = tiny_transformer()
    merged = fuse_qkv(copy.deepcopy(reference))
    with pytest.raises(TypeError, match="QwenDoubleStreamAttnProcessor2_0 reads attn.to_q.*unfuse_qkv"):
        merged.set_attn_processor(QwenDoubleStreamAttnProcessor2_0())
    assert all(isinstance(p, MergedQKVAttnProcessor) for p in merged.attn_processors.values())
    merged.set_attn_processor(MergedQKVAttnProcessor())
    merged.set_attention_backend("native")
    assert relative_error(forward(merged), forward(reference)) <= 1e-5

    unfuse_qkv(merged)
    merged.set_attn_processor(QwenDoubleStreamAttnProcessor2_0())
    assert relative_error(forward(merged), forward(reference)) == 0.0


# ----------------------------------------------------------------------------------------------- tensor parallel
def test_tp_plan_packs_qkv_and_resolves_on_a_merged_model():
    from diffusers.hooks.tensor_parallel import PackedColwiseParallel, resolve_tp_shard_specs

    merged = fuse_qkv(QwenImageTransformer2DModel(num_layers=2, attention_head_dim=16, num_attention_heads=4))
    plan = merged._tp_plan
    assert isinstance(plan["transformer_blocks.*.attn.to_qkv"], PackedColwiseParallel)
    assert not any(key.endswith(("to_q", "to_k", "to_v", "add_q_proj")) for key in plan)
    specs = resolve_tp_shard_specs(merged, plan, 2)
    assert specs["transformer_blocks.1.attn.add_qkv_proj.weight"].block_sizes == [64, 64, 64]
    assert type(unfuse_qkv(merged))._tp_plan is merged._tp_plan  # the class plan again


@pytest.mark.slow
def test_tensor_parallel_on_two_cpu_ranks_matches_diffusers(tmp_path):
    result = tmp_path / "tp.json"
    run = subprocess.run(
        [sys.executable, str(REPO / "tests" / "tp_worker.py"), str(result)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    if run.returncode != 0 and "gloo" in run.stderr.lower() and "connect" in run.stderr.lower():
        pytest.skip(f"gloo cannot connect on this machine: {run.stderr.strip().splitlines()[-1]}")
    assert run.returncode == 0, run.stderr[-3000:]
    for rank in json.loads(result.read_text()):
        assert rank["local_qkv_rows_are_own_heads"], rank
        assert rank["qkv_block_sizes"] == [64, 64, 64]
        assert rank["merged_vs_diffusers"] <= 1e-5, rank
        assert rank["merged_tp_vs_diffusers_tp"] <= 1e-6, rank
        assert rank["naive_colwise_vs_diffusers"] > 0.1, rank  # the test can tell a wrong split


# ------------------------------------------------------------------------------------------------- float8 storage
def cast_fp8(model):
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    return model


def test_fuse_and_unfuse_keep_diffusers_fp8_layerwise_casting():
    reference = cast_fp8(tiny_transformer())
    cast_then_fused = fuse_qkv(cast_fp8(tiny_transformer()))
    fused_then_cast = cast_fp8(fuse_qkv(tiny_transformer()))
    attn = cast_then_fused.transformer_blocks[0].attn
    assert attn.to_qkv.weight.dtype == torch.float8_e4m3fn
    assert attn.to_qkv._diffusers_hook.get_hook("layerwise_casting") is not None
    for name, tensor in fused_then_cast.state_dict().items():
        assert torch.equal(cast_then_fused.state_dict()[name], tensor), name
    expected = forward(reference)
    assert relative_error(forward(cast_then_fused), expected) <= 1e-5
    assert attn.to_qkv.weight.dtype == torch.float8_e4m3fn  # cast back to storage after the forward

    unfuse_qkv(cast_then_fused)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(cast_then_fused.state_dict()[name], tensor), name  # bit for bit, fp8 included
    assert attn.to_q._diffusers_hook.get_hook("layerwise_casting") is not None
    assert relative_error(forward(cast_then_fused), expected) == 0.0


def test_fuse_refuses_layers_it_cannot_rebuild_and_leaves_the_model_as_it_was():
    model = tiny_transformer()
    apply_fp8_storage(model.transformer_blocks[1], compute_dtype=torch.float32)
    with pytest.raises(TypeError, match=r"transformer_blocks\.1\.attn\.to_q is a Fp8StorageLinear.*before casting"):
        fuse_qkv(model)
    assert not hasattr(model.transformer_blocks[0].attn, "to_qkv")  # block 0 was not fused either

    offloaded = tiny_transformer()
    offloaded.enable_group_offload(torch.device("cpu"), offload_type="leaf_level")
    with pytest.raises(RuntimeError, match=r"to_q carries diffusers hooks \['group_offloading'\].*before enabling"):
        fuse_qkv(offloaded)


# ------------------------------------------------------------------------------------------- through a pipeline
def test_a_pipeline_with_a_merged_transformer_saves_standard_and_loads_standard_loras(tiny_t2i_path, tmp_path):
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(tiny_t2i_path, transformer=load_transformer(tiny_t2i_path))
    assert is_merged(pipe.transformer)
    pipe.save_pretrained(tmp_path / "pipe")
    stock = QwenImagePipeline.from_pretrained(tmp_path / "pipe")  # stock diffusers, standard layout on disk
    original = QwenImageTransformer2DModel.from_pretrained(tiny_t2i_path / "transformer")
    for key, tensor in original.state_dict().items():
        assert torch.equal(stock.transformer.state_dict()[key], tensor), key

    donor = copy.deepcopy(stock.transformer)  # a standard LoRA of the pipeline's own size, made by PEFT
    donor.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False))
    lora = {f"transformer.{key}": value for key, value in get_peft_model_state_dict(donor).items()}
    stock.load_lora_weights(lora)
    pipe.load_lora_weights(lora)
    assert "transformer_blocks.0.attn.to_qkv" in adapted_modules(pipe.transformer)
    text_hidden = stock.transformer.config.joint_attention_dim
    inputs = make_inputs(SHAPES)
    inputs["encoder_hidden_states"] = torch.randn(*inputs["encoder_hidden_states"].shape[:2], text_hidden)
    with torch.no_grad():
        outputs = [model(**inputs).sample for model in (pipe.transformer, stock.transformer)]
    assert relative_error(*outputs) <= 1e-5
