"""Every LoRA key style ComfyUI's Qwen-Image loader accepts is read with its scale, and bad LoRAs are refused by name.

Right values: diffusers' own loader where it reads the style, and ComfyUI's rule (tests/lora_clients) always.
The refusals are checked at each entry point that reads a LoRA: read_lora (convert, infer), detect, convert.
"""

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from fusedit.convert import convert_checkpoint, read_lora
from fusedit.detect import detect
from tests.convert_utils import bf16_valued, tiny_transformer
from tests.lora_clients import assert_same_deltas, comfyui_rule_deltas, diffusers_deltas, linear_names

D = 32
MODULES = {  # module -> (rank, alpha, out features)
    "transformer_blocks.0.attn.to_q": (4, 8.0, D),
    "transformer_blocks.0.attn.to_v": (4, 1.0, D),
    "transformer_blocks.1.img_mlp.net.0.proj": (2, 3.0, 128),
    "transformer_blocks.1.attn.add_k_proj": (8, 4.0, D),
}


def write_style(path, prefix, down, up, flat=False, alpha=True, extra=None):
    tensors, expected = {}, {}
    for i, (module, (rank, a, out)) in enumerate(MODULES.items()):
        name = prefix + (module.replace(".", "_") if flat else module)
        A, B = bf16_valued((rank, D), i), bf16_valued((out, rank), i + 20)
        tensors[name + down], tensors[name + up] = A, B
        if alpha:
            tensors[name + ".alpha"] = torch.tensor(a)
        expected[module] = (B.double() @ A.double()) * (a / rank if alpha else 1.0)
    tensors.update(extra or {})
    save_file(tensors, path)
    return expected


# (prefix, A suffix, B suffix, flat names, diffusers reads it, reported format)
STYLES = {
    "comfyui-trainer": ("diffusion_model.", ".lora_down.weight", ".lora_up.weight", False, True, "comfyui"),
    "lightning-bare": ("", ".lora_down.weight", ".lora_up.weight", False, True, "comfyui"),
    "transformer-down-up": ("transformer.", ".lora_down.weight", ".lora_up.weight", False, False, "diffusers"),
    "kohya": ("lora_unet_", ".lora_down.weight", ".lora_up.weight", True, True, "kohya"),
    "lycoris": ("lycoris_", ".lora_down.weight", ".lora_up.weight", True, False, "kohya"),
    "comfyui-lora_A": ("diffusion_model.", ".lora_A.weight", ".lora_B.weight", False, True, "comfyui"),
    "bare-lora_A-alpha": ("", ".lora_A.weight", ".lora_B.weight", False, True, "peft"),
    "diffsynth": ("", ".lora_A.default.weight", ".lora_B.default.weight", False, True, "diffsynth"),
    "lora.down": ("diffusion_model.", ".lora.down.weight", ".lora.up.weight", False, False, "comfyui"),
}


@pytest.mark.parametrize("style", STYLES)
def test_every_comfyui_key_style_is_read_with_its_scale(tmp_path, style):
    prefix, down, up, flat, diffusers_reads, fmt = STYLES[style]
    path = tmp_path / "lora.safetensors"
    expected = write_style(path, prefix, down, up, flat)
    comfy, not_loaded = comfyui_rule_deltas(path, linear_names(tiny_transformer()))
    if down in (".lora_down.weight", ".lora_A.weight", ".lora_A.default.weight"):  # the styles the helper knows
        assert not not_loaded
        assert_same_deltas(comfy, expected, "ComfyUI rule")  # the test data means what we think it means
    if diffusers_reads:
        assert_same_deltas(diffusers_deltas(path, tiny_transformer()), expected, "diffusers")
    lora = read_lora(path)
    assert lora.format == fmt
    got = {m: (mod.B.double() @ mod.A.double()) * mod.scale for m, mod in lora.modules.items()}
    assert_same_deltas(got, expected, f"fusedit {style}")
    report = detect(path)
    assert report["num_modules"] == len(MODULES) and report["alpha_source"] == "alpha tensors"
    assert report["scales"] == sorted({a / r for r, a, _ in MODULES.values()})
    # convert keeps the scale into every format (checked by the clients in test_lora_strength)
    convert_checkpoint(path, tmp_path / "out.safetensors", format="kohya")
    back = read_lora(tmp_path / "out.safetensors")
    assert_same_deltas({m: (x.B.double() @ x.A.double()) * x.scale for m, x in back.modules.items()}, expected, "out")


def test_the_old_self_contradicting_message_is_gone(tmp_path):
    write_style(tmp_path / "l.safetensors", "diffusion_model.", ".lora_down.weight", ".lora_up.weight")
    assert read_lora(tmp_path / "l.safetensors").format == "comfyui"  # was "neither ... lora_down/lora_up ..."


@pytest.mark.parametrize(
    "extra, named",
    [
        ({"diffusion_model.transformer_blocks.0.attn.to_q.diff": torch.zeros(D, D)}, r"full-weight delta"),
        ({"diffusion_model.transformer_blocks.0.attn.to_q.diff_b": torch.zeros(D)}, r"bias delta"),
        (
            {"diffusion_model.transformer_blocks.0.attn.to_q.dora_scale": torch.zeros(1, D)},
            r"ComfyUI/LyCORIS DoRA scale",
        ),
        ({"diffusion_model.transformer_blocks.0.attn.to_q.hada_w1_a": torch.zeros(2, D)}, r"LyCORIS"),
    ],
    ids=["diff", "diff_b", "dora", "loha"],
)
def test_patch_keys_are_refused_by_name_everywhere(tmp_path, extra, named):
    path = tmp_path / "l.safetensors"
    write_style(path, "diffusion_model.", ".lora_down.weight", ".lora_up.weight", extra=extra)
    (key,) = extra
    pattern = rf"not LoRA factors \({named}\): {re.escape(key)}.*ComfyUI"
    for entry in (read_lora, detect, lambda p: convert_checkpoint(p, tmp_path / "o.safetensors", format="diffusers")):
        with pytest.raises(ValueError, match=pattern):
            entry(path)
    assert not (tmp_path / "o.safetensors").exists()


def _bad_alpha_files(tmp_path):
    files = {}
    for name, value in [("nan", math.nan), ("inf", math.inf), ("absurd", 1e30)]:
        path = tmp_path / f"tensor-{name}.safetensors"
        write_style(path, "diffusion_model.", ".lora_down.weight", ".lora_up.weight")
        tensors = load_file(path)
        tensors["diffusion_model.transformer_blocks.0.attn.to_v.alpha"] = torch.tensor(value)
        save_file(tensors, path)
        files[path] = r"diffusion_model\.transformer_blocks\.0\.attn\.to_v\.alpha"
        path = tmp_path / f"meta-{name}.safetensors"
        tensors = {k: v for k, v in tensors.items() if not k.endswith(".alpha")}
        tensors = {
            k.replace("diffusion_model.", "transformer.").replace("lora_down", "lora_A").replace("lora_up", "lora_B"): v
            for k, v in tensors.items()
        }
        save_file(
            tensors,
            path,
            {
                "lora_adapter_metadata": json.dumps(
                    {
                        "transformer.r": 4,
                        "transformer.lora_alpha": value,
                        "transformer.rank_pattern": {"img_mlp.net.0.proj": 2, "add_k_proj": 8},
                    }
                )
            },
        )
        files[path] = r"metadata alpha of transformer_blocks\."
    path = tmp_path / "tensor-values.safetensors"
    write_style(path, "", ".lora_down.weight", ".lora_up.weight")
    tensors = load_file(path)
    tensors["transformer_blocks.1.attn.add_k_proj.lora_up.weight"][0, 0] = math.nan
    save_file(tensors, path)
    files[path] = r"non-finite .*transformer_blocks\.1\.attn\.add_k_proj\.lora_up\.weight"
    path = tmp_path / "rank0.safetensors"
    tensors = {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(0, D),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(D, 0),
    }
    save_file(tensors, path)
    files[path] = r"to_q\.lora_A\.weight \[0, 32\]: rank 0"
    return files


def test_nan_inf_absurd_alphas_values_and_rank_0_are_refused_at_every_entry_point(tmp_path):
    for path, named in _bad_alpha_files(tmp_path).items():
        for entry in (read_lora, detect, lambda p: convert_checkpoint(p, tmp_path / "o.safetensors", format="kohya")):
            with pytest.raises(ValueError, match=named):
                entry(path)
        assert not (tmp_path / "o.safetensors").exists()


def test_detect_cli_never_prints_nan(tmp_path, capsys):
    from fusedit.cli import main

    path = tmp_path / "tensor-nan.safetensors"
    files = _bad_alpha_files(tmp_path)
    assert path in files
    for bad in (path, tmp_path / "meta-nan.safetensors"):
        assert main(["detect", str(bad)]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.startswith("fusedit detect: error: ") and "alpha" in captured.err
        assert len(captured.err.strip().splitlines()) == 1
