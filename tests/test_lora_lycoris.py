"""lora.type=lokr|loha (PEFT's LoKr / LoHa, fusedit.lora.lycoris): trained on either QKV layout, exported in the
standard layout with ComfyUI's keys so that every q/k/v weight gets exactly the row block of the trained to_qkv
update (the factors read back with ComfyUI's scale rule, written out here), training moves the adapter, resume and
EMA are exact, a LoKr that does not split is refused with the factor that fixes it, and fusedit's own reader names
the adapter type."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fusedit.cli import main as fusedit_main
from fusedit.convert import read_lora
from fusedit.errors import UserInputError
from fusedit.lora.adapter import export_lora
from fusedit.lora.lycoris import MERGED_GROUPS, exact_factor, lycoris_delta, lycoris_layers, read_lycoris, w1_rows
from fusedit.step.build import build_transformer, load
from fusedit.step.config import LoraSpec, ModelConfig
from fusedit.step.precision import Precision
from fusedit.training.ema import LoRAEMA
from fusedit.training.validate_config import ConfigError, validate_train_config
from tests.test_lora import _inputs, _randomise
from tests.test_optim import fit, lora_state
from tests.training_utils import compose_train

NAMES = {"lokr": "LoKr", "loha": "LoHa"}


def file_deltas(path, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Module -> the weight update ComfyUI's LoKr / LoHa adapters apply at strength `scale` (their scale rule: alpha
    over the rank of a low-rank factor, 1 without one; fusedit.lora.lycoris.read_lycoris, the rule infer.py applies
    too, checked against ComfyUI's own loader in tests/test_comfyui_loader.py), in fp64."""
    modules = read_lycoris(load_file(str(path)), str(path))
    return {m: lycoris_delta(f, scale * s, torch.float64) for m, (f, s) in modules.items()}


def trained_deltas(model) -> dict[str, torch.Tensor]:
    """Standard module -> the trained model's update (PEFT's get_delta_weight), a merged module's split by rows."""
    deltas = {}
    for name, module in model.named_modules():
        if not hasattr(module, "get_delta_weight") or "default" not in getattr(module, "scaling", {}):
            continue
        delta = module.get_delta_weight("default").double()
        prefix, _, leaf = name.rpartition(".")
        parts = MERGED_GROUPS.get(leaf)
        if parts is None:
            deltas[name] = delta
        else:
            deltas.update({f"{prefix}.{part}": rows for part, rows in zip(parts, delta.chunk(len(parts)), strict=True)})
    return deltas


CASES = {  # id -> (layout, LoraSpec keywords)
    "lokr-merged": ("merged_qkv", dict(type="lokr", rank=2, alpha=3, decompose_factor=6)),  # w1 full, w2 low-rank
    "lokr-merged-full": ("merged_qkv", dict(type="lokr", rank=8, alpha=3, decompose_factor=6)),  # some w2 full
    "loha-merged": ("merged_qkv", dict(type="loha", rank=2, alpha=3)),
    "lokr-standard": ("standard", dict(type="lokr", rank=2, alpha=3)),
    "loha-standard": ("standard", dict(type="loha", rank=2, alpha=3)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_export_gives_each_projection_the_trained_update(tmp_path, tiny_edit_path, case):
    layout, spec = CASES[case]
    torch.manual_seed(0)
    trained = build_transformer(tiny_edit_path, ModelConfig(layout=layout), LoraSpec("attn_mlp", **spec), Precision())
    _randomise(trained, seed=1, std=0.3)  # every factor away from its start (w1 starts at zero)
    path = export_lora(trained, tmp_path / "final.safetensors", step="7")
    assert load_file(str(path)) and not any("qkv" in key for key in load_file(str(path)))

    got, expected = file_deltas(path), trained_deltas(trained)
    assert set(got) == set(expected) and any(m.endswith(".to_q") for m in got)
    for module, delta in expected.items():
        rel = (got[module] - delta).norm() / delta.norm()
        assert delta.norm() > 0 and rel <= 1e-6, f"{module}: rel {rel:.2e}"

    # The stock standard model with those updates added computes what the trained model computes.
    stock = load(tiny_edit_path, "standard", torch.float32)
    with torch.no_grad():
        for module, delta in got.items():
            stock.get_submodule(module).weight += delta.float()
        inputs = _inputs()
        torch.testing.assert_close(stock(**inputs)[0], trained(**inputs)[0], rtol=1e-4, atol=1e-5)

    # fusedit's own reader (inference, conversion, detect) names the adapter type in one line.
    with pytest.raises(UserInputError, match=f"is a {NAMES[spec['type']]} adapter"):
        read_lora(path)


def test_lokr_whose_update_does_not_split_is_refused_with_the_factor_that_fixes_it(tiny_edit_path, sample_metadata):
    # tiny to_qkv [96, 32]: PEFT's default factorisation gives w1 8 rows, which 3 does not divide
    message = r"w1 with 8 rows, not a multiple of 3.*set lora.decompose_factor=12 \(or model.layout=standard\)$"
    paths = [f"model.path={tiny_edit_path}", f"data.metadata={sample_metadata}", "lora=attn", "lora.type=lokr"]
    with pytest.raises(ConfigError, match=message):  # before the model loads, from its config.json
        validate_train_config(compose_train(paths))
    validate_train_config(compose_train([*paths, "lora.decompose_factor=12"]))
    validate_train_config(compose_train([*paths, "model=standard"]))  # q/k/v apart: nothing to split
    with pytest.raises(UserInputError, match=message):  # and when the adapter is added, for callers of the stages
        build_transformer(tiny_edit_path, ModelConfig(), LoraSpec("attn", rank=2, type="lokr"), Precision())
    assert exact_factor(9216, 3) == 96 and w1_rows(9216) == 96  # Qwen-Image's to_qkv: PEFT's default is exact
    spec = LoraSpec("attn", rank=2, type="lokr", decompose_factor=12)
    build_transformer(tiny_edit_path, ModelConfig(), spec, Precision())


def adapter_updates(module) -> list[torch.Tensor]:
    """Every adapted layer's weight update (PEFT's get_delta_weight)."""
    return [layer.get_delta_weight("default") for layer in lycoris_layers(module.transformer).values()]


def lycoris_module(tiny_edit_path, conditioner, adapter_type: str):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from fusedit.step.objective import FlowMatchObjective
    from fusedit.training.module import EditLoRAModule

    cfg = compose_train(["optim.lr=1e-2"])
    torch.manual_seed(0)
    spec = LoraSpec("attn", rank=2, alpha=2, type=adapter_type, decompose_factor=12 if adapter_type == "lokr" else -1)
    transformer = build_transformer(tiny_edit_path, ModelConfig(), spec, Precision())
    return EditLoRAModule(
        transformer,
        conditioner,
        FlowMatchObjective(),
        instantiate(cfg.optim.optimizer),
        OmegaConf.to_container(cfg.optim.scheduler, resolve=True),
    )


@pytest.fixture(scope="module")
def conditioner(tiny_edit_path):
    from fusedit.step.conditioning import EditConditioner

    return EditConditioner.from_pretrained(tiny_edit_path)


@pytest.fixture(scope="module")
def sample_metadata(tmp_path_factory):
    from fusedit.data import make_sample_dataset

    return make_sample_dataset(tmp_path_factory.mktemp("data"), n=2, size=32)


@pytest.fixture(scope="module")
def batch(sample_metadata) -> dict:
    from fusedit.data import EditDataModule

    datamodule = EditDataModule(sample_metadata, batch_size=2)
    datamodule.setup()
    return next(iter(datamodule.train_dataloader()))


def test_lokr_training_moves_every_factor_and_resume_with_ema_is_exact(tmp_path, tiny_edit_path, conditioner, batch):
    module = lycoris_module(tiny_edit_path, conditioner, "lokr")
    start = lora_state(module)
    assert start and all(".lokr_" in name for name in start)  # the trainable set is the adapter's factors
    uninterrupted_ema = LoRAEMA(decay=0.5)
    fit(module, batch, 2, callbacks=[uninterrupted_ema])
    uninterrupted = lora_state(module)
    moved = [name for name, value in uninterrupted.items() if not torch.equal(value, start[name])]
    assert len(moved) == len(start), f"untrained factors: {set(start) - set(moved)}"
    assert all(update.any() for update in adapter_updates(module))  # w1 = 0 at the start: the update was 0

    first = lycoris_module(tiny_edit_path, conditioner, "lokr")
    fit(first, batch, 1, callbacks=[LoRAEMA(decay=0.5)]).save_checkpoint(tmp_path / "step1.ckpt")
    resumed, resumed_ema = lycoris_module(tiny_edit_path, conditioner, "lokr"), LoRAEMA(decay=0.5)
    fit(resumed, batch, 2, ckpt_path=tmp_path / "step1.ckpt", callbacks=[resumed_ema])
    for name, value in uninterrupted.items():
        torch.testing.assert_close(lora_state(resumed)[name], value, rtol=0, atol=0, msg=name)
    expected = uninterrupted_ema.averaged_parameters()
    for name, value in resumed_ema.averaged_parameters().items():
        assert torch.equal(value, expected[name]), name


def test_loha_training_moves_every_factor(tiny_edit_path, conditioner, batch):
    module = lycoris_module(tiny_edit_path, conditioner, "loha")
    start = lora_state(module)
    assert start and all(".hada_" in name for name in start)
    assert not any(update.any() for update in adapter_updates(module))  # w2b = 0 at the start
    fit(module, batch, 1)
    assert all(not torch.equal(value, start[name]) for name, value in lora_state(module).items())
    assert all(update.any() for update in adapter_updates(module))  # the gradient reached w2b


def test_detect_names_the_type_convert_refuses_and_infer_asks_for_fuse(tmp_path, tiny_edit_path, capsys):
    import json

    from fusedit.inference.preflight import LoraSpec as InferLora
    from fusedit.inference.preflight import lora_file, lycoris_file_type, lycoris_needs_fuse

    trained = build_transformer(tiny_edit_path, ModelConfig(), LoraSpec("attn", rank=2, type="loha"), Precision())
    path = export_lora(trained, tmp_path / "loha.safetensors")
    assert fusedit_main(["detect", str(path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "lora" and report["adapter_type"] == "loha" and report["layout"] == "standard"
    assert "attn.to_q" in report["target_modules"] and report["scales"] == [1.0]  # alpha / r = 2 / 2
    assert fusedit_main(["convert", "--input", str(path), "--output", str(tmp_path / "o.safetensors")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "is a LoHa adapter" in lines[0] and "lora.fuse=true" in lines[0], lines
    # infer.py's preflight reads the header only, before the pipeline loads: the file is fine, fuse is asked for
    assert lora_file(InferLora(str(path))) == path and lycoris_file_type(path) == "LoHa"
    assert lycoris_needs_fuse("lora.path", path).endswith("set lora.fuse=true (its strength is then fixed for the run)")


# ------------------------------------------------------------------------------------------- applied by infer.py
def exported(tmp_path, model_path, layout: str, spec: dict, seed: int):
    torch.manual_seed(seed)
    trained = build_transformer(model_path, ModelConfig(layout=layout), LoraSpec("attn_mlp", **spec), Precision())
    _randomise(trained, seed=seed, std=0.6)  # large enough to change the tiny pipeline's 8-bit image clearly
    return export_lora(trained, tmp_path / f"{spec['type']}-{layout}.safetensors")


def patched(model_path, updates) -> torch.nn.Module:
    """The stock standard-layout transformer with W + delta added for every (file, scale) of `updates` (fp64 sum;
    the merged layout computes what the standard one does, tests/test_merged_qkv.py)."""
    from fusedit.model import load_transformer

    stock = load_transformer(model_path, "standard", dtype=torch.float32)
    with torch.no_grad():
        for path, scale in updates:
            for module, delta in file_deltas(path, scale).items():
                weight = stock.get_submodule(module).weight
                weight.copy_((weight.double() + delta).float())
    return stock


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


@pytest.fixture(scope="module")
def adapter_files(tiny_edit_path, tmp_path_factory):
    """A LoKr trained on the merged layout, a LoHa trained on the standard one (both exported as training does),
    a plain LoRA, and the reference outputs: the stock model with W + scale x the file's update, per (file, scale)."""
    from tests.test_inference import random_lora

    tmp_path = tmp_path_factory.mktemp("lycoris")
    files = {
        "lokr": exported(tmp_path, tiny_edit_path, "merged_qkv", dict(type="lokr", rank=2, alpha=3, decompose_factor=6), 1),
        "loha": exported(tmp_path, tiny_edit_path, "standard", dict(type="loha", rank=2, alpha=3), 2),
    }  # fmt: skip
    from fusedit.model import load_transformer

    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    files["lora"] = random_lora(load_transformer(tiny_edit_path, "standard", torch.float32), tmp_path, targets, 2, 2.0)
    with torch.no_grad():
        expected = {
            (kind, scale): patched(tiny_edit_path, [(files[kind], scale)])(**_inputs())[0]
            for kind in ("lokr", "loha")
            for scale in (1.0, 0.5)
        }
    return files, expected


@pytest.mark.parametrize("layout", ["merged_qkv", "standard"])
def test_load_loras_fuses_lokr_and_loha_at_their_strength_on_both_layouts(tiny_edit_path, adapter_files, layout):
    from fusedit.inference.lora import load_loras
    from fusedit.inference.preflight import LoraSpec as InferLora
    from fusedit.model import load_transformer

    files, expected = adapter_files
    stock = load_transformer(tiny_edit_path, layout, dtype=torch.float32)
    with torch.no_grad():
        base = stock(**_inputs())[0]
    fused = {}
    for (kind, scale), output in expected.items():
        model = load_transformer(tiny_edit_path, layout, dtype=torch.float32)
        with pytest.raises(UserInputError, match=r"adapter, which infer.py applies as a dense weight update only"):
            load_loras(model, [InferLora(str(files[kind]), scale)])
        records = load_loras(model, [InferLora(str(files[kind]), scale)], fuse=True)
        assert records[0]["adapter_type"] == kind and records[0]["applied_layout"] == layout
        with torch.no_grad():
            actual = model(**_inputs())[0]
        assert relative_error(actual, output) <= 1e-4, (kind, scale)
        assert relative_error(output, base) > 1e-2  # the adapter matters ...
        if scale == 0.5:  # ... and strength 0.5 is half the weight update, not the full one
            assert relative_error(actual, expected[kind, 1.0]) > 1e-3
        fused[kind, scale] = model

    # A LoRA and a LoKr in one list (fused): the LoKr adds the same update to the weights as alone.
    both = load_transformer(tiny_edit_path, layout, dtype=torch.float32)
    load_loras(both, [InferLora(str(files["lora"]), 0.7), InferLora(str(files["lokr"]), 0.5)], fuse=True)
    lora_only = load_transformer(tiny_edit_path, layout, dtype=torch.float32)
    load_loras(lora_only, [InferLora(str(files["lora"]), 0.7)], fuse=True)
    changed = 0
    for name, module in stock.named_modules():
        if isinstance(module, torch.nn.Linear):
            lokr_update = weight_of(fused["lokr", 0.5], name) - module.weight.detach()
            torch.testing.assert_close(
                weight_of(both, name) - weight_of(lora_only, name), lokr_update, rtol=0, atol=1e-6
            )
            changed += bool(lokr_update.any())
    assert changed >= 2


def weight_of(model, name: str) -> torch.Tensor:
    layer = model.get_submodule(name)
    return getattr(layer, "base_layer", layer).weight.detach()


@pytest.fixture(scope="module")
def stock_pipeline(tiny_t2i_path):
    """diffusers' own QwenImagePipeline on the tiny text-to-image folder (fp32)."""
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(str(tiny_t2i_path), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(("kind", "layout", "scale"), [("lokr", "merged_qkv", 1.0), ("loha", "standard", 0.5)])
def test_infer_image_with_a_lokr_or_loha_is_the_stock_image_with_the_update_added(
    tiny_t2i_path, adapter_files, stock_pipeline, tmp_path, kind, layout, scale
):
    from fusedit.inference.preflight import preflight
    from fusedit.inference.run import infer
    from tests.test_inference import cfg_for, diffusers_pixels, pixels

    path = adapter_files[0][kind]
    common = [f"model.path={tiny_t2i_path}", "prompt=a red cube", "sampling.true_cfg_scale=3.5", f"model={layout}"]
    common += [f"lora.path={path}", f"lora.scale={scale}"]
    if kind == "lokr":  # without lora.fuse: one line from the preflight, before the pipeline loads
        with pytest.raises(UserInputError, match=r"^lora.path=.*lokr-.*is a LoKr adapter.*set lora.fuse=true"):
            preflight(cfg_for(*common, f"output={tmp_path / 'refused.png'}"))
    record = infer(cfg_for(*common, "lora.fuse=true", f"output={tmp_path / 'o.png'}"))
    assert record["loras"][0]["adapter_type"] == kind and record["loras"][0]["scale"] == scale

    stock = stock_pipeline
    base = diffusers_pixels(stock, prompt="a red cube")
    original = {name: value.clone() for name, value in stock.transformer.state_dict().items()}
    with torch.no_grad():
        for module, delta in file_deltas(path, scale).items():
            weight = stock.transformer.get_submodule(module).weight
            weight.copy_((weight.double() + delta).float())
    reference = diffusers_pixels(stock, prompt="a red cube")
    stock.transformer.load_state_dict(original)
    assert np.abs(reference - base).max() > 20  # the adapter changes the image ...
    assert np.abs(pixels(tmp_path / "o.png") - reference).max() <= 1  # ... as W + scale x dW does (8-bit rounding)


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_qwen21_adapter_trained_merged_is_fused_back_onto_its_merged_modules(tmp_path, tiny_qwen21_path, kind):
    """Qwen-Image-2.1 (same infer path): a LoKr / LoHa trained on the merged to_qkv and gate_up_proj, exported in
    the standard layout, fused onto the merged model puts exactly the trained update into each merged weight."""
    from fusedit.inference.lora import load_loras
    from fusedit.inference.preflight import LoraSpec as InferLora
    from fusedit.model import load_transformer

    spec = dict(type=kind, rank=2, alpha=3, **({"decompose_factor": 6} if kind == "lokr" else {}))
    trained = build_transformer(tiny_qwen21_path, ModelConfig(), LoraSpec("attn_mlp", **spec), Precision())
    _randomise(trained, seed=3, std=0.3)
    path = export_lora(trained, tmp_path / f"{kind}.safetensors")
    stock = load_transformer(tiny_qwen21_path, "merged_qkv", dtype=torch.float32)
    fused = load_transformer(tiny_qwen21_path, "merged_qkv", dtype=torch.float32)
    load_loras(fused, [InferLora(str(path), 0.5)], fuse=True)
    layers = lycoris_layers(trained)
    assert any(name.endswith("gate_up_proj") for name in layers) and any(name.endswith("to_qkv") for name in layers)
    for name, layer in layers.items():
        expected = 0.5 * layer.get_delta_weight("default")
        got = weight_of(fused, name) - weight_of(stock, name)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6, msg=name)


def test_detect_reads_a_lycoris_file_without_importing_peft(tmp_path):
    # detect reads the file's factors and shapes only; PEFT's import took ~9 s of detect's 11 s (fusedit.lora.lycoris
    # imports PEFT where an adapter is built or walked).
    import subprocess
    import sys

    from safetensors.torch import save_file

    prefix = "diffusion_model.transformer_blocks.0.attn.to_q"
    factors = {"hada_w1_a": (24, 2), "hada_w1_b": (2, 24), "hada_w2_a": (24, 2), "hada_w2_b": (2, 24)}
    tensors = {f"{prefix}.{name}": torch.randn(shape) for name, shape in factors.items()}
    save_file({**tensors, f"{prefix}.alpha": torch.tensor(2.0)}, tmp_path / "loha.safetensors")
    code = (
        "import sys; from fusedit.detect import detect; "
        f"assert detect({str(tmp_path / 'loha.safetensors')!r})['adapter_type'] == 'loha'; "
        "assert 'peft' not in sys.modules, 'detect imported PEFT'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
