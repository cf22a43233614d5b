"""Ground truth for ComfyUI: fusedit's LoRA files through ComfyUI's own loader, on ComfyUI's own Qwen-Image model.

Opt-in (`-m comfyui`): ComfyUI is GPL-3.0 and not a dependency, so it is imported from a checkout named by
`FUSEDIT_COMFYUI=/path/to/ComfyUI` and the tests are skipped, with the reason, when that is unset or does not
import (its extra pure-python dependencies: docs/conversion.md, "Checking against ComfyUI itself"). Nothing of
ComfyUI is copied here: the tests call its `LoraLoaderModelOnly` node (file -> `comfy.sd.load_lora_for_models` ->
`comfy.lora.load_lora` with the Qwen-Image key map) and `ModelPatcher.patch_model`, on `comfy.ldm.qwen_image`'s
model built at the tiny pipeline's sizes with the tiny transformer's weights, on CPU, and compare every patched
weight with W + scale·B·A (float64) from the adapter fusedit trained; every other weight must stay bit-identical.
tests/lora_clients.py's `comfyui_rule_deltas` emulates the same rule for the default run.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path

import pytest
import torch

from fusedit.convert import read_lora, write_lora
from fusedit.convert.lora_formats import FORMATS
from fusedit.lora import add_lora, export_lora
from tests.convert_utils import tiny_transformer
from tests.lora_clients import per_module_lora, trained_adapter

pytestmark = pytest.mark.comfyui

ENV = "FUSEDIT_COMFYUI"
# fp32 weights: patching rounds W + delta once to fp32, so the error relative to the delta is about 2^-24 · |W| / |delta|.
TOLERANCE = 1e-5


def import_comfyui(root: str):
    """ComfyUI's `nodes`, `folder_paths`, `comfy.supported_models` and `comfy.model_patcher`, forced onto the CPU."""
    if root not in sys.path:
        sys.path.append(root)  # appended: ComfyUI's top-level names (utils, app, ...) must not shadow anything else
    cli_args = importlib.import_module("comfy.cli_args")
    cli_args.args.cpu = True  # read by comfy.model_management when it is first imported, just below
    names = ("nodes", "folder_paths", "comfy.supported_models", "comfy.model_patcher")
    return [importlib.import_module(name) for name in names]


@pytest.fixture(scope="module")
def comfyui(tmp_path_factory):
    root = os.environ.get(ENV)
    if not root:
        pytest.skip(f"set {ENV}=/path/to/ComfyUI (with its dependencies installed) to run ComfyUI's own loader")
    try:
        nodes, folder_paths, supported_models, model_patcher = import_comfyui(root)
    except Exception as error:  # noqa: BLE001 — any failure to import an optional client is a reason to skip
        pytest.skip(f"ComfyUI at {root} does not import: {type(error).__name__}: {error}")
    loras = tmp_path_factory.mktemp("comfyui_loras")
    folder_paths.add_model_folder_path("loras", str(loras), is_default=True)

    reference = tiny_transformer(seed=9)
    config = reference.config
    unet_config = {
        "image_model": "qwen_image",
        **{key: config[key] for key in ("patch_size", "in_channels", "out_channels", "num_layers")},
        **{key: config[key] for key in ("attention_head_dim", "num_attention_heads", "joint_attention_dim")},
        "axes_dims_rope": tuple(config["axes_dims_rope"]),
    }
    model_config = supported_models.QwenImage(unet_config)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    model.load_model_weights({key: value.clone() for key, value in reference.state_dict().items()}, "")
    assert model.diffusion_model.state_dict().keys() == reference.state_dict().keys()
    cpu = torch.device("cpu")
    patcher = model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    return nodes.LoraLoaderModelOnly(), patcher, loras


def comfyui_patched_deltas(comfyui, path: Path, caplog, strength: float = 1.0) -> dict[str, torch.Tensor]:
    """weight key -> (patched - original) in float64 after ComfyUI's LoraLoaderModelOnly + patch_model; fails on
    any key ComfyUI reports as not loaded."""
    node, patcher, loras = comfyui
    assert path.parent == loras
    original = {key: value.double() for key, value in patcher.model.diffusion_model.state_dict().items()}
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        (patched,) = node.load_lora_model_only(patcher, path.name, strength)
    not_loaded = [r.getMessage() for r in caplog.records if "not loaded" in r.getMessage().lower()]
    assert not not_loaded, f"ComfyUI did not load part of {path.name}: {not_loaded[:3]}"
    patched.patch_model()
    try:
        after = {key: value.double() for key, value in patched.model.diffusion_model.state_dict().items()}
    finally:
        patched.unpatch_model()
    return {key: after[key] - original[key] for key in original}


def assert_patched_as_trained(deltas, expected, strength, what) -> float:
    """Every trained module's weight moved by strength·scale·B·A, every other weight untouched; the worst relative
    error (over the delta's largest entry)."""
    worst = 0.0
    for key, delta in deltas.items():
        module = key.removesuffix(".weight")
        if module not in expected or not key.endswith(".weight"):
            assert not delta.any(), f"{what}: ComfyUI changed {key}, which the LoRA does not train"
            continue
        want = strength * expected[module]
        error = (delta - want).abs().max().item() / want.abs().max().item()
        assert error < TOLERANCE, f"{what}: {module} off by {error:.3g} (relative)"
        worst = max(worst, error)
    missing = set(expected) - {key.removesuffix(".weight") for key in deltas}
    assert not missing, f"{what}: modules not in ComfyUI's model: {sorted(missing)[:3]}"
    print(f"{what}: {len(expected)} modules, max relative error {worst:.3g}")
    return worst


@pytest.mark.parametrize("use_rslora", [False, True], ids=["alpha8-rank4", "rslora-alpha6-rank8"])
def test_every_format_fusedit_writes_loads_at_the_trained_strength_in_comfyui(comfyui, caplog, use_rslora):
    rank, alpha = (8, 6.0) if use_rslora else (4, 8.0)
    model, expected = trained_adapter(rank, alpha, use_rslora)
    loras = comfyui[2]
    exported = export_lora(model, loras / f"final-{use_rslora}.safetensors")  # what training writes to lora/
    files = {"training export": exported}
    for fmt in FORMATS:  # what `fusedit convert --format FMT` writes from it
        files[fmt] = write_lora(read_lora(exported), loras / f"{fmt}-{use_rslora}.safetensors", fmt)
    for what, path in files.items():
        assert_patched_as_trained(comfyui_patched_deltas(comfyui, path, caplog), expected, 1.0, what)


@pytest.mark.parametrize("fmt", FORMATS)
def test_per_module_alphas_load_at_their_own_strength_in_comfyui(comfyui, caplog, fmt):
    lora, expected = per_module_lora()
    path = write_lora(lora, comfyui[2] / f"per-module-{fmt}.safetensors", fmt)
    # the node's strength multiplies the file's own scale
    assert_patched_as_trained(comfyui_patched_deltas(comfyui, path, caplog, 0.5), expected, 0.5, fmt)


def test_the_check_sees_a_wrong_strength_and_a_partial_load(comfyui, caplog):
    """The comparison can fail: a file with alpha only in its metadata (how fusedit wrote diffusers files before
    the scale was folded) lands at scale 1 in ComfyUI, and merged `to_qkv` keys are reported as not loaded."""
    from safetensors.torch import save_file

    model, expected = trained_adapter(4, 8.0, use_rslora=False)
    tensors = {
        f"transformer.{name}.lora_{factor}.weight": getattr(layer, f"lora_{factor}")["default"].weight.detach()
        for name, layer in model.named_modules()
        if hasattr(layer, "lora_A") and "default" in layer.lora_A
        for factor in "AB"
    }
    metadata_only = comfyui[2] / "alpha-in-metadata-only.safetensors"
    save_file(tensors, str(metadata_only), metadata={"lora_alpha": "8.0"})
    deltas = comfyui_patched_deltas(comfyui, metadata_only, caplog)
    with pytest.raises(AssertionError, match="off by 0.5"):
        assert_patched_as_trained(deltas, expected, 1.0, "alpha in metadata only")

    merged, _ = trained_adapter(4, 8.0, use_rslora=False, merged=True)
    merged_copy = export_lora(merged, comfyui[2] / "merged-layout.safetensors", layout="merged_qkv")
    with pytest.raises(AssertionError, match="did not load part"):
        comfyui_patched_deltas(comfyui, merged_copy, caplog)


def test_dora_is_refused_for_comfyui_whose_dora_scale_is_not_doras_norm(comfyui, caplog):
    """A DoRA LoRA (lora.type=dora) is not written as comfyui/kohya, and this is why, measured on ComfyUI itself:
    fusedit's DoRA file (diffusers keys) leaves its `lora_magnitude_vector` keys unloaded, and the same adapter in
    ComfyUI's own key (`dora_scale` [out, 1] beside the factors) is patched to m / ||W|| * (W + s B A), the *base*
    weight's row norm, where DoRA's weight (PEFT, diffusers, fusedit) is m / ||W + s B A|| * (W + s B A). Should
    ComfyUI ever divide by the adapted weight's norm, the last check fails and the comfyui format can hold DoRA."""
    from safetensors.torch import save_file

    from fusedit.errors import UserInputError

    model = tiny_transformer(seed=3)
    add_lora(model, rank=4, alpha=8.0, targets="attn", type="dora")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # factors and magnitudes away from their start, as training moves them
        for name, parameter in sorted(model.named_parameters()):
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
            elif "lora_magnitude_vector" in name:
                parameter.mul_(1 + 0.5 * torch.rand(parameter.shape, generator=generator))
    loras = comfyui[2]
    exported = export_lora(model, loras / "dora.safetensors")
    with pytest.raises(UserInputError, match="a DoRA LoRA cannot be written as comfyui: ComfyUI's dora_scale"):
        write_lora(read_lora(exported), loras / "dora-comfyui.safetensors", "comfyui")
    with pytest.raises(AssertionError, match="did not load part"):
        comfyui_patched_deltas(comfyui, exported, caplog)

    lora = read_lora(exported)
    tensors = {}
    for module, mod in lora.modules.items():
        tensors[f"diffusion_model.{module}.lora_A.weight"] = mod.A.contiguous()
        tensors[f"diffusion_model.{module}.lora_B.weight"] = mod.B.contiguous()
        tensors[f"diffusion_model.{module}.alpha"] = torch.tensor(mod.alpha)
        tensors[f"diffusion_model.{module}.dora_scale"] = mod.magnitude.reshape(-1, 1).contiguous()
    by_hand = loras / "dora-scale-by-hand.safetensors"
    save_file(tensors, str(by_hand))
    deltas = comfyui_patched_deltas(comfyui, by_hand, caplog)
    base = {key: value.double() for key, value in comfyui[1].model.diffusion_model.state_dict().items()}
    worst_dora = 0.0
    for module, mod in lora.modules.items():
        W = base[f"{module}.weight"]
        adapted = W + mod.delta().double()
        magnitude = mod.magnitude.double().reshape(-1, 1)
        comfy_rule = magnitude / W.norm(dim=1, keepdim=True) * adapted
        dora = magnitude / adapted.norm(dim=1, keepdim=True) * adapted
        patched = W + deltas[f"{module}.weight"]
        torch.testing.assert_close(patched, comfy_rule, rtol=1e-5, atol=1e-6)
        worst_dora = max(worst_dora, ((patched - dora).abs().max() / dora.abs().max()).item())
    print(f"ComfyUI dora_scale vs DoRA: max relative difference {worst_dora:.3g}")
    assert worst_dora > 1e-2


# to_qkv of the loader's tiny model is [96, 32]: decompose_factor 6 gives LoKr's w1 6 rows (a multiple of 3); rank 8
# keeps some factors full (ComfyUI applies those unscaled: fusedit folds the scale into w1 there)
LYCORIS_CASES = {
    "lokr-merged": (True, dict(type="lokr", rank=2, alpha=3.0, decompose_factor=6)),
    "lokr-merged-full": (True, dict(type="lokr", rank=8, alpha=3.0, decompose_factor=6)),
    "loha-merged": (True, dict(type="loha", rank=2, alpha=3.0)),
    "lokr-standard": (False, dict(type="lokr", rank=2, alpha=3.0)),
    "loha-standard": (False, dict(type="loha", rank=2, alpha=3.0)),
}


@pytest.mark.parametrize("case", list(LYCORIS_CASES))
def test_lokr_and_loha_exports_load_at_the_trained_strength_in_comfyui(comfyui, caplog, case):
    """lora.type=lokr|loha: ComfyUI's LoKr / LoHa adapters patch each q/k/v weight with the row block of the trained
    merged update (PEFT's get_delta_weight), at the trained scale times the node's strength."""
    from fusedit.lora.adapter import lora_parameters
    from fusedit.model.merged_qkv import fuse_qkv
    from tests.test_lora_lycoris import trained_deltas

    merged, spec = LYCORIS_CASES[case]
    model = tiny_transformer(seed=3)
    if merged:
        fuse_qkv(model)
    add_lora(model, targets="attn_mlp", **spec)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every factor away from its start, as training moves them
        for _, parameter in sorted(lora_parameters(model).items()):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    expected = trained_deltas(model)
    path = export_lora(model, comfyui[2] / f"{case}.safetensors")
    for strength in (1.0, 0.5):
        deltas = comfyui_patched_deltas(comfyui, path, caplog, strength)
        assert_patched_as_trained(deltas, expected, strength, f"{case} at strength {strength}")
