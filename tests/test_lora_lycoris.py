"""lora.type=lokr|loha (PEFT's LoKr / LoHa, fusedit.lora.lycoris): trained on either QKV layout, exported in the
standard layout with ComfyUI's keys so that every q/k/v weight gets exactly the row block of the trained to_qkv
update (the factors read back with ComfyUI's scale rule, written out here), training moves the adapter, resume and
EMA are exact, a LoKr that does not split is refused with the factor that fixes it, and fusedit's own reader names
the adapter type."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from fusedit.cli import main as fusedit_main
from fusedit.convert import read_lora
from fusedit.errors import UserInputError
from fusedit.lora.adapter import export_lora
from fusedit.lora.lycoris import MERGED_GROUPS, exact_factor, lycoris_layers, w1_rows
from fusedit.step.build import build_transformer, load
from fusedit.step.config import LoraSpec, ModelConfig
from fusedit.step.precision import Precision
from fusedit.training.ema import LoRAEMA
from fusedit.training.validate_config import ConfigError, validate_train_config
from tests.test_lora import _inputs, _randomise
from tests.test_optim import fit, lora_state
from tests.training_utils import compose_train

PREFIX = "diffusion_model."
NAMES = {"lokr": "LoKr", "loha": "LoHa"}


def file_deltas(path) -> dict[str, torch.Tensor]:
    """Module -> the weight update ComfyUI's LoKr / LoHa adapters apply at strength 1 (their scale rule: alpha over
    the rank of a low-rank factor, 1 without one), in fp64."""
    tensors = {key: value.double() for key, value in load_file(str(path)).items()}
    modules = {key.removeprefix(PREFIX).rpartition(".")[0] for key in tensors}
    deltas = {}
    for module in modules:
        f = {key.rpartition(".")[2]: value for key, value in tensors.items() if key.startswith(f"{PREFIX}{module}.")}
        alpha = f.get("alpha")
        if "hada_w1_a" in f:
            scale = 1.0 if alpha is None else float(alpha) / f["hada_w1_b"].shape[0]
            deltas[module] = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"]) * scale
            continue
        w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
        w2 = f["lokr_w2"] if "lokr_w2" in f else f["lokr_w2_a"] @ f["lokr_w2_b"]
        dim = f["lokr_w2_b"].shape[0] if "lokr_w2_b" in f else f["lokr_w1_b"].shape[0] if "lokr_w1_b" in f else None
        scale = float(alpha) / dim if alpha is not None and dim is not None else 1.0
        deltas[module] = torch.kron(w1, w2) * scale
    return deltas


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


def test_detect_convert_and_infer_name_the_adapter_type(tmp_path, tiny_edit_path, capsys):
    from fusedit.inference.preflight import LoraSpec as InferLora
    from fusedit.inference.preflight import lora_file

    trained = build_transformer(tiny_edit_path, ModelConfig(), LoraSpec("attn", rank=2, type="loha"), Precision())
    path = export_lora(trained, tmp_path / "loha.safetensors")
    for command in (
        ["detect", str(path)],
        ["convert", "--input", str(path), "--output", str(tmp_path / "o.safetensors")],
    ):
        assert fusedit_main(command) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "is a LoHa adapter" in lines[0] and "ComfyUI" in lines[0], lines
    # infer.py's preflight reads the header only, before the pipeline loads
    with pytest.raises(UserInputError, match=r"^lora.path=.*loha.safetensors: is a LoHa adapter"):
        lora_file(InferLora(str(path)))
