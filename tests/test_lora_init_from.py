"""`lora.init_from`: training starts from a LoRA file, and at step 0 computes what diffusers computes with that file."""

import math

import pytest
import torch
from safetensors.torch import save_file

from fusedit.lora.init_from import read_init_lora
from fusedit.step.build import build_transformer, load
from fusedit.step.config import LoraSpec, ModelConfig
from fusedit.step.precision import Precision
from fusedit.training.validate_config import ConfigError, validate_train_config
from tests.convert_utils import bf16_valued
from tests.training_utils import compose_train

D = 32
# block 0 only (the last block's text-side Linears are not trained); kohya keys, per-module alphas, one rank 2
MODULES = {
    "transformer_blocks.0.attn.to_q": (4, 8.0, D),
    "transformer_blocks.0.attn.to_k": (4, 2.0, D),
    "transformer_blocks.0.attn.to_v": (4, 3.0, D),
    "transformer_blocks.0.attn.add_q_proj": (4, 4.0, D),
    "transformer_blocks.0.attn.to_out.0": (4, 1.0, D),
    "transformer_blocks.0.img_mlp.net.0.proj": (2, 16.0, 4 * D),
}


def kohya_file(path, modules=MODULES, alpha_override=None):
    tensors = {}
    for i, (module, (rank, alpha, out)) in enumerate(modules.items()):
        name = "lora_unet_" + module.replace(".", "_")
        tensors[f"{name}.lora_down.weight"] = bf16_valued((rank, D), i) * 0.3
        tensors[f"{name}.lora_up.weight"] = bf16_valued((out, rank), i + 40) * 0.3
        tensors[f"{name}.alpha"] = torch.tensor(alpha if alpha_override is None else alpha_override)
    save_file(tensors, path)
    return path


def _inputs():
    generator = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(1, 8, 64, generator=generator),
        "encoder_hidden_states": torch.randn(1, 5, 32, generator=generator),
        "encoder_hidden_states_mask": None,
        "timestep": torch.tensor([0.6]),
        "img_shapes": [[(1, 2, 2), (1, 2, 2)]],
        "return_dict": False,
    }


@pytest.mark.parametrize("layout", ["standard", "merged_qkv"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_step_0_equals_diffusers_with_the_file(tmp_path, tiny_edit_path, layout, use_rslora):
    from diffusers import QwenImageEditPipeline

    path = kohya_file(tmp_path / "start.safetensors")
    lora = {"rank": 4, "alpha": 4, "targets": "attn_mlp", "use_rslora": use_rslora, "init_from": str(path)}
    started = build_transformer(tiny_edit_path, ModelConfig(layout=layout), LoraSpec(**lora), Precision())
    reference = load(tiny_edit_path, "standard", "float32")
    pipe = QwenImageEditPipeline(
        scheduler=None, vae=None, text_encoder=None, tokenizer=None, processor=None, transformer=reference
    )
    pipe.load_lora_weights(str(path), adapter_name="file")
    with torch.no_grad():
        expected = reference(**_inputs())[0]
        got = started(**_inputs())[0]
        reference.disable_lora()
        base = reference(**_inputs())[0]
    assert (expected - base).abs().max() > 1e-3  # the LoRA matters
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    trainable = [n for n, p in started.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_rank_and_targets_are_checked_against_the_config_in_one_line(tmp_path):
    path = kohya_file(tmp_path / "start.safetensors")
    with pytest.raises(ValueError, match=r"has rank 4, but lora.rank=8: set lora.rank=4") as error:
        read_init_lora(path, 8, "attn_mlp", "standard")
    assert len(str(error.value).splitlines()) == 1
    with pytest.raises(ValueError, match=r"modules lora.targets does not train: .*img_mlp.*add them to lora.targets"):
        read_init_lora(path, 4, "attn", "merged_qkv")
    with pytest.raises(ValueError, match=r"does not exist"):
        read_init_lora(tmp_path / "missing.safetensors", 4, "attn", "standard")


@pytest.mark.parametrize("bad", [math.nan, math.inf, 1e30])
def test_a_bad_file_is_refused_by_config_validation_before_the_model_loads(tmp_path, tiny_edit_path, bad):
    path = kohya_file(tmp_path / "bad.safetensors", alpha_override=bad)
    metadata = tmp_path / "data.jsonl"
    metadata.write_text("")
    cfg = compose_train(
        [f"model.path={tiny_edit_path}", f"data.metadata={metadata}", "lora.rank=4", f"lora.init_from={path}"]
    )
    with pytest.raises(ConfigError, match=r"lora.init_from: .*bad\.safetensors: .*alpha"):
        validate_train_config(cfg)
