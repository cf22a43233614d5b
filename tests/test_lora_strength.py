"""Every LoRA file fusedit writes applies at the trained strength in diffusers' real loader and under ComfyUI's rule.

Right values: the trained PEFT adapter's own B·A·scaling (rsLoRA included) or the LoraWeights that were written;
compared with what `QwenImageEditPipeline.load_lora_weights` attaches and what ComfyUI's rule (tests/lora_clients)
computes from the file alone, for every format, alpha != rank, per-module alphas and rsLoRA.
"""

import pytest

from fusedit.convert import read_lora, write_lora
from fusedit.convert.lora_formats import FORMATS
from fusedit.lora import export_lora
from fusedit.model.merged_qkv import fuse_qkv
from tests.convert_utils import tiny_transformer
from tests.lora_clients import (
    assert_same_deltas,
    comfyui_rule_deltas,
    diffusers_deltas,
    linear_names,
    per_module_lora,
    trained_adapter,
)


def check_both_clients(path, expected, what):
    got = diffusers_deltas(path, tiny_transformer(seed=9), peft=what == "peft")
    assert_same_deltas(got, expected, f"diffusers {what}")
    comfy, not_loaded = comfyui_rule_deltas(path, linear_names(tiny_transformer(seed=9)))
    assert not not_loaded, f"ComfyUI {what}: keys not loaded {not_loaded[:5]}"
    assert_same_deltas(comfy, expected, f"ComfyUI {what}")


@pytest.mark.parametrize("use_rslora", [False, True], ids=["alpha8-rank4", "rslora-alpha6-rank8"])
def test_training_export_and_every_converted_format_load_at_the_trained_strength(tmp_path, use_rslora):
    rank, alpha = (8, 6.0) if use_rslora else (4, 8.0)
    model, expected = trained_adapter(rank, alpha, use_rslora)
    exported = export_lora(model, tmp_path / "final.safetensors")  # what training writes to lora/
    check_both_clients(exported, expected, "training export")
    for fmt in FORMATS:  # what `fusedit convert --format FMT` writes from it
        path = write_lora(read_lora(exported), tmp_path / f"{fmt}.safetensors", fmt)
        check_both_clients(path, expected, fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_per_module_alphas_load_at_their_own_strength(tmp_path, fmt):
    lora, expected = per_module_lora()
    path = write_lora(lora, tmp_path / f"{fmt}.safetensors", fmt)
    check_both_clients(path, expected, fmt)
    # and a second conversion from that file (musubi -> diffusers -> kohya, say) keeps it
    again = write_lora(read_lora(path), tmp_path / "again.safetensors", "kohya" if fmt != "kohya" else "diffusers")
    check_both_clients(again, expected, f"{fmt} then converted")


def test_merged_layout_training_copy_loads_at_the_trained_strength_in_diffusers(tmp_path):
    model, expected = trained_adapter(4, 8.0, use_rslora=True, merged=True)
    path = export_lora(model, tmp_path / "merged.safetensors", layout="merged_qkv")
    target = fuse_qkv(tiny_transformer(seed=9))  # ComfyUI has no merged Qwen model: diffusers only here
    from diffusers import QwenImageEditPipeline

    pipe = QwenImageEditPipeline(
        scheduler=None, vae=None, text_encoder=None, tokenizer=None, processor=None, transformer=target
    )
    pipe.load_lora_weights(str(path), adapter_name="client")
    got = {
        name: (layer.lora_B["client"].weight.double() @ layer.lora_A["client"].weight.double())
        * layer.scaling["client"]
        for name, layer in target.named_modules()
        if hasattr(layer, "lora_A") and "client" in layer.lora_A
    }
    assert_same_deltas(got, expected, "merged copy")
