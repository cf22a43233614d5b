"""The tiny pipeline factory: real diffusers/transformers classes load and run what make_tiny writes."""

from __future__ import annotations

import argparse
import json
import os
import time

import diffusers
import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as edit_plus_module
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from fusedit.step.objective import QWEN_SCHEDULER_CONFIG as SCHEDULER_CONFIG
from fusedit.tiny import QWEN21, VARIANTS, add_cli, build_tokenizer, ensure_tiny, make_tiny, tiny_variant

PIPELINES = {
    "edit": diffusers.QwenImageEditPipeline,
    "edit-plus": diffusers.QwenImageEditPlusPipeline,
    "edit-2511": diffusers.QwenImageEditPlusPipeline,
    "t2i": diffusers.QwenImagePipeline,
}
FIXTURES = {
    "edit": "tiny_edit_path",
    "edit-plus": "tiny_edit_plus_path",
    "edit-2511": "tiny_edit_2511_path",
    "t2i": "tiny_t2i_path",
}
TRANSFORMER_FILE = os.path.join("transformer", "diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != QWEN21])  # 2.1: tests/test_qwen21_tiny.py
def test_pipeline_loads_and_runs_on_cpu(variant, request, monkeypatch):
    path = request.getfixturevalue(FIXTURES[variant])
    if variant in ("edit-plus", "edit-2511"):
        # Two edit images at the pipeline's fixed 1 MP VAE size take ~15 s on 2 cores; the size is a module
        # constant, so shrink it here (the "edit" case keeps the full-size path).
        monkeypatch.setattr(edit_plus_module, "VAE_IMAGE_SIZE", 256 * 256)
    start = time.perf_counter()
    pipe = PIPELINES[variant].from_pretrained(path)
    loaded = time.perf_counter()
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe) is PIPELINES[variant]
    assert pipe.transformer.config.zero_cond_t == (variant == "edit-2511")
    kwargs = {
        "prompt": "make the square red",
        "num_inference_steps": 2,
        "height": 64,
        "width": 80,
        "true_cfg_scale": 1.0,
        "generator": torch.Generator().manual_seed(0),
        "output_type": "pt",
    }
    if variant != "t2i":
        image = Image.new("RGB", (40, 32), (30, 120, 200))
        kwargs["image"] = [image, image] if variant != "edit" else image
    images = pipe(**kwargs).images
    ran = time.perf_counter()
    print(f"{variant}: load {loaded - start:.2f}s, 2-step run {ran - loaded:.2f}s")
    assert images.shape == (1, 3, 64, 80)
    assert torch.isfinite(images).all()
    assert images.std() > 0  # random weights still give a non-constant image


def test_layout_and_configs_match_qwen_image(tiny_edit_path):
    names = {p.name for p in tiny_edit_path.iterdir()}
    assert {"model_index.json", "transformer", "vae", "text_encoder", "tokenizer", "processor", "scheduler"} <= names
    index = json.loads((tiny_edit_path / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImageEditPipeline"
    scheduler = json.loads((tiny_edit_path / "scheduler" / "scheduler_config.json").read_text())
    assert {key: scheduler[key] for key in SCHEDULER_CONFIG} == SCHEDULER_CONFIG
    transformer = json.loads((tiny_edit_path / "transformer" / "config.json").read_text())
    text = json.loads((tiny_edit_path / "text_encoder" / "config.json").read_text())
    vae = json.loads((tiny_edit_path / "vae" / "config.json").read_text())
    assert transformer["joint_attention_dim"] == text["text_config"]["hidden_size"]
    assert sum(transformer["axes_dims_rope"]) == transformer["attention_head_dim"]
    assert transformer["in_channels"] == 4 * vae["z_dim"] and transformer["out_channels"] == vae["z_dim"]
    assert len(vae["latents_mean"]) == len(vae["latents_std"]) == vae["z_dim"]


def test_tokenizer_has_qwen_special_tokens_and_template_lengths(tiny_edit_path):
    from transformers import Qwen2Tokenizer

    tokenizer = Qwen2Tokenizer.from_pretrained(tiny_edit_path / "tokenizer")
    text = json.loads((tiny_edit_path / "text_encoder" / "config.json").read_text())
    for key, token in [
        ("image_token_id", "<|image_pad|>"),
        ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"),
        ("vision_end_token_id", "<|vision_end|>"),
    ]:
        assert tokenizer.convert_tokens_to_ids(token) == text[key]
    ids = tokenizer("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>ünïcode 你好<|im_end|>").input_ids
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nünïcode 你好"
    assert max(ids) < text["text_config"]["vocab_size"]


@pytest.mark.parametrize("variant", ["t2i", "edit", "edit-plus"])
def test_dropped_template_prefix_is_exactly_the_system_prompt(variant, request):
    # The pipelines drop a fixed number of leading template tokens (34 for t2i, 64 for edit), counted with
    # Qwen's tokenizer; with the tiny tokenizer that count must also cover exactly "<|im_start|>system...user\n".
    pipe = PIPELINES[variant].from_pretrained(request.getfixturevalue(FIXTURES[variant]))
    prefix = pipe.prompt_template_encode.split("{}")[0].replace("<|vision_start|><|image_pad|><|vision_end|>", "")
    assert prefix.endswith("<|im_start|>user\n")
    assert len(pipe.tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx


def test_same_seed_is_bit_identical_and_other_seed_differs(tmp_path, tiny_edit_path):
    again = make_tiny(tmp_path / "again", "edit", seed=0)
    other = make_tiny(tmp_path / "other", "edit", seed=1)
    for component in ("transformer", "vae", "text_encoder"):
        files = sorted(p.relative_to(tiny_edit_path) for p in (tiny_edit_path / component).glob("*.safetensors"))
        assert files
        for file in files:
            assert (tiny_edit_path / file).read_bytes() == (again / file).read_bytes(), file
    first = load_file(tiny_edit_path / TRANSFORMER_FILE)
    second = load_file(other / TRANSFORMER_FILE)
    assert first.keys() == second.keys()
    assert not any(torch.equal(first[key], second[key]) for key in first if first[key].std() > 0)


def test_make_tiny_leaves_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_tiny(tmp_path / "t", "t2i", num_layers=1)
    assert torch.equal(torch.rand(3), expected)


def test_make_tiny_refuses_nonempty_out_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not empty"):
        make_tiny(out, "t2i", num_layers=1)
    assert (out / "keep.txt").read_text() == "precious"
    make_tiny(out, "t2i", num_layers=1, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model_index.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp or trash directories left behind
    assert (out / TRANSFORMER_FILE).stat().st_mode & 0o044  # readable by others, not mkstemp's 0600


def test_layers_and_bad_arguments(tmp_path):
    out = make_tiny(tmp_path / "three", "edit", num_layers=3)
    assert json.loads((out / "transformer" / "config.json").read_text())["num_layers"] == 3
    with pytest.raises(ValueError, match="unknown tiny variant 'edit-3000'"):
        make_tiny(tmp_path / "bad", "edit-3000")
    with pytest.raises(ValueError, match="num_layers"):
        make_tiny(tmp_path / "zero", "edit", num_layers=0)
    assert not (tmp_path / "bad").exists() and not (tmp_path / "zero").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["three"]


def test_ensure_tiny_creates_once_then_reuses(tmp_path, tiny_t2i_path):
    path = tmp_path / "cache" / "tiny"
    assert ensure_tiny(path, "t2i") == path
    stamp = (path / TRANSFORMER_FILE).stat().st_mtime_ns
    assert ensure_tiny(path, "t2i") == path
    assert (path / TRANSFORMER_FILE).stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="holds a 't2i' pipeline, but a 'edit' one"):
        ensure_tiny(path, "edit")
    assert tiny_variant(tiny_t2i_path) == "t2i"


def test_ensure_tiny_keeps_the_winner_of_a_race(tmp_path, monkeypatch):
    from fusedit import tiny

    path = tmp_path / "tiny"
    real_build = tiny._build_into_temp

    def build_while_another_process_wins(out, variant, seed, num_layers):
        tmp = real_build(out, variant, seed, num_layers)
        real_build(out, variant, seed, num_layers).rename(out)  # the other process renames in first
        (out / "winner").write_text("")
        return tmp

    monkeypatch.setattr(tiny, "_build_into_temp", build_while_another_process_wins)
    assert ensure_tiny(path, "t2i", num_layers=1) == path
    assert (path / "winner").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


def test_cli_make_tiny(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="fusedit")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["make-tiny", str(tmp_path / "cli"), "--variant", "edit-2511", "--seed", "3", "--layers", "1"]
    )
    assert args.func(args) == 0
    printed = capsys.readouterr()
    assert printed.out.strip() == str(tmp_path / "cli")
    assert "Writing model shards" not in printed.err  # transformers' per-component save bar: noise for 1 shard
    assert tiny_variant(tmp_path / "cli") == "edit-2511"
    with pytest.raises(SystemExit):
        parser.parse_args(["make-tiny", str(tmp_path / "x"), "--variant", "nope"])


def test_build_tokenizer_is_deterministic():
    assert build_tokenizer()._tokenizer.to_str() == build_tokenizer()._tokenizer.to_str()
