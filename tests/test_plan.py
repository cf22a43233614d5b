"""Training plans (fusedit.plan): the prediction, the plan chosen per card at the real shape, the profiles' fit, and
the refusal of a plan predicted not to fit before any weight loads.

The full-shape tests share one set of estimates (~1-2 min of fake-tensor runs and meta builds on 2 cores), kept in
pytest's cache directory so that later runs on the same machine reuse them."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from fusedit.bench.memory import estimate_step_memory
from fusedit.bench.shapes import SHAPES
from fusedit.bench.variants import Variant
from fusedit.errors import UserInputError
from fusedit.plan import TrainPlan, choose, plan_report
from fusedit.plan.choose import encode_phase
from fusedit.plan.predict import (
    _BENCH_LORA_STEP_BYTES,
    RUN_DTYPES,
    Estimates,
    ModelFacts,
    model_facts,
    predict,
    transformer_facts,
)
from tests.training_utils import compose_train

# Issue 11's targets: predicted peak at the full shape per profile (GB), on the card it names.
PROFILE_TARGETS = {"a100": (80, 70), "h100": (80, 70), "rtx4090": (24, 22), "16gb": (16, 15), "12gb": (12, 11)}


@pytest.fixture(scope="module")
def full_estimates(request) -> Estimates:
    return Estimates(request.config.cache.mkdir("fusedit-plan") / "estimates.json")


def full_cfg(overrides):
    return compose_train([*overrides, "paths.root_dir=/tmp/unused"])


def _tiny_facts(num_layers: int = 4) -> ModelFacts:
    shape = SHAPES["tiny"].replace(num_layers=num_layers)
    block_bytes, other_bytes, lora = transformer_facts(shape, "merged_qkv")
    return ModelFacts(shape, "merged_qkv", block_bytes, other_bytes, lora, encoder_parameters=0)


@pytest.mark.parametrize("run_dtype", ["bf16", "fp32"])
def test_depth_extrapolation_reproduces_the_full_depth_fake_run(run_dtype):
    """Activations per checkpoint interval k are predicted from depths k and 2k; at 6 blocks (tiny width) that must
    match the 4-block fake-tensor run (at the full shape, checked by hand for k = 0, 1, 2, 3 against the recorded
    60-block runs: 114.30, 46.71, 79.96, 91.42 GB vs 114.30, 46.70, 79.96, 91.42 in BENCHMARKS.md)."""
    facts = _tiny_facts()
    estimates = Estimates()
    for every in (1, 2):
        variant = Variant(name="v", checkpoint_every=every)
        real = estimate_step_memory(variant, facts.shape, RUN_DTYPES[run_dtype])["step_gb"]
        lora_step_gb = facts.lora_parameters * _BENCH_LORA_STEP_BYTES[run_dtype] / 1e9
        predicted = estimates.activations_gb(facts, every, run_dtype) + lora_step_gb
        # At the tiny width a few KB of per-step constants do not scale with depth (0.1 %).
        assert predicted == pytest.approx(real, rel=5e-3), every


def test_an_fp32_run_is_predicted_in_fp32():
    """precision=fp32 holds the base, the encoders and the activations in fp32 and no bf16 copy of the LoRA: the
    prediction must equal the fake-tensor fp32 step (weights, inputs and all), not the bf16 one."""
    facts = _tiny_facts(num_layers=2)
    estimates = Estimates()
    fp32 = predict(facts, estimates, fp8=False, checkpoint_every=1, cache=True, fp32=True)
    bf16 = predict(facts, estimates, fp8=False, checkpoint_every=1, cache=True)
    real = estimate_step_memory(Variant(name="v", checkpoint_every=1), facts.shape, torch.float32)
    inputs_gb = real["resident_gb"] - (facts.block_bytes["fp32"] * 2 + facts.other_bytes["fp32"]) / 1e9
    inputs_gb -= facts.lora_parameters * 4 / 1e9  # the fp32 LoRA weights are resident too
    assert fp32.peak_gpu_gb + inputs_gb == pytest.approx(real["peak_gb"], rel=5e-3)
    assert fp32.transformer_gb == pytest.approx(2 * bf16.transformer_gb, rel=0.01)
    assert fp32.lora_gb == pytest.approx(facts.lora_parameters * (4 + 4 + 8) / 1e9)
    with_encoders = dataclasses.replace(facts, encoder_parameters=1_000_000)
    assert predict(with_encoders, estimates, fp8=False, checkpoint_every=1, cache=False, fp32=True).encoders_gb == 0.004


def test_a_precision_fp32_config_is_planned_as_fp32(full_estimates, monkeypatch):
    monkeypatch.setattr("fusedit.plan.report.Estimates", lambda path=None: full_estimates)
    bf16 = plan_report(full_cfg(["trainer=a100"]), "full", 80)
    fp32 = plan_report(full_cfg(["trainer=a100", "precision=fp32"]), "full", 80)
    assert fp32["plan"]["fp32"] and "precision=fp32" in fp32["plan_overrides"] and not fp32["fits"]
    assert fp32["parts_gb"]["transformer"] == pytest.approx(2 * bf16["parts_gb"]["transformer"], rel=0.01)
    assert fp32["parts_gb"]["encoders"] == pytest.approx(2 * bf16["parts_gb"]["encoders"], rel=0.01)
    assert fp32["parts_gb"]["activations"] > 1.5 * bf16["parts_gb"]["activations"]
    assert "precision=bf16" in fp32["fits_with"]


def test_auto_picks_the_expected_plan_per_card_at_the_full_shape(full_estimates):
    facts = model_facts(SHAPES["full"], "merged_qkv", estimates=full_estimates)
    assert facts.num_blocks == 60 and facts.lora_parameters == 187_564_032
    assert facts.block_bytes["fp8"] * 2 == pytest.approx(facts.block_bytes["bf16"], rel=0.01)
    assert 8.2e9 < facts.encoder_parameters < 8.6e9  # Qwen2.5-VL-7B + the VAE
    expected = {
        80: TrainPlan(checkpoint_every=1),
        24: TrainPlan(1, fp8=True, cache=True, optim="adamw8bit", resident_blocks=41),
        16: TrainPlan(1, fp8=True, cache=True, optim="adamw8bit", resident_blocks=20, encode="offload"),
        12: TrainPlan(1, fp8=True, cache=True, optim="adamw8bit", resident_blocks=10, encode="offload"),
    }
    for gpu_gb, plan in expected.items():
        choice = choose(facts, full_estimates, gpu_gb, eight_bit=True)
        assert choice.fits and choice.plan == plan, (gpu_gb, choice.plan)
        assert choice.prediction.peak_gpu_gb <= 0.875 * gpu_gb
    streamed = choose(facts, full_estimates, 12, eight_bit=True).prediction
    assert streamed.host_gb == pytest.approx(50 * facts.block_bytes["fp8"] / 1e9)
    assert streamed.moved_gb_per_step == pytest.approx(2 * streamed.host_gb)


def test_the_encoding_pass_of_encode_then_train_fits_too_at_the_full_shape(full_estimates, monkeypatch):
    """Qwen2.5-VL-7B alone (16.6 GB bf16) fits 24 GB but not 16 or 12: there the cache is filled with the text
    encoder's layers streamed from host memory; a config that would encode on the GPU anyway is refused."""
    facts = model_facts(SHAPES["full"], "merged_qkv", estimates=full_estimates)
    assert facts.encoder_largest_leaf == 152064 * 3584 and 0.1e9 < facts.vae_parameters < 0.2e9
    for gpu_gb, mode in {24: "gpu", 16: "offload", 12: "offload"}.items():
        encode = choose(facts, full_estimates, gpu_gb, eight_bit=True).encode
        assert encode.mode == mode and encode.fits and encode.peak_gpu_gb <= 0.875 * gpu_gb, (gpu_gb, encode)
    on_gpu, offload, cpu = (encode_phase(facts, mode, 12) for mode in ("gpu", "offload", "cpu"))
    assert not on_gpu.fits and on_gpu.peak_gpu_gb > 16.5
    text_gb = (facts.encoder_parameters - facts.vae_parameters) * 2 / 1e9
    assert offload.peak_gpu_gb < 2.5 and offload.host_to_gpu_gb_per_row == pytest.approx(text_gb)
    assert offload.s_per_row == pytest.approx(text_gb / 25)  # PCIe 4.0 x16's practical 25 GB/s
    assert cpu.peak_gpu_gb == 0 and cpu.s_per_row > offload.s_per_row
    monkeypatch.setattr("fusedit.plan.report.Estimates", lambda path=None: full_estimates)
    report = plan_report(full_cfg(["trainer=12gb", "cache.offload=false"]), "full", 12)
    assert not report["fits"] and report["predicted_peak_gpu_gb"] <= 10.5  # the step fits, the encoding does not
    assert report["encode_phase"]["mode"] == "gpu" and report["encode_phase"]["predicted_peak_gpu_gb"] > 16.5
    assert "cache.offload=true" in report["fits_with"]


@pytest.mark.parametrize("profile", list(PROFILE_TARGETS))
def test_each_gpu_profile_fits_its_card_at_the_full_shape(profile, full_estimates, monkeypatch):
    monkeypatch.setattr("fusedit.plan.report.Estimates", lambda path=None: full_estimates)
    gpu_gb, target = PROFILE_TARGETS[profile]
    report = plan_report(full_cfg([f"trainer={profile}"]), "full", gpu_gb)
    assert report["fits"] and report["predicted_peak_gpu_gb"] <= target, report
    encode = report["encode_phase"]
    assert encode is None or (encode["fits"] and encode["predicted_peak_gpu_gb"] <= target), encode
    assert report["shape"]["num_layers"] == 60 and report["shape"]["image_tokens"] == 8192


def test_the_docs_profile_table_is_the_planners(full_estimates):
    from pathlib import Path

    from fusedit.plan.table import profiles_table

    doc = (Path(__file__).resolve().parents[1] / "docs" / "performance.md").read_text()
    table = profiles_table(full_estimates)
    assert table in doc, "docs/performance.md's profile table is stale: paste `python -m fusedit.plan.table`:\n" + table


def test_a_profile_predicted_not_to_fit_names_the_figure_and_the_fix(full_estimates, monkeypatch):
    monkeypatch.setattr("fusedit.plan.report.Estimates", lambda path=None: full_estimates)
    report = plan_report(full_cfg(["trainer=a100", "model.activation_checkpointing=0"]), "full", 80)
    assert not report["fits"] and report["predicted_peak_gpu_gb"] > 100
    assert "model.activation_checkpointing=1" in report["fits_with"]


def test_a_gpu_run_that_will_not_fit_is_refused_before_any_weight_loads(tmp_path, tiny_edit_path, monkeypatch):
    import fusedit.plan.config as plan_config
    import fusedit.training.train as train_module
    from fusedit.data import make_sample_dataset
    from tests.training_utils import train_cfg

    metadata = make_sample_dataset(tmp_path / "data", n=2, size=32)
    monkeypatch.setattr(plan_config, "_gpu_run", lambda cfg: True)  # as on a GPU machine
    import fusedit.training.validate_config as validate_config

    monkeypatch.setattr(validate_config, "_check_accelerator", lambda cfg, problems: None)  # ...whose CUDA it checks
    monkeypatch.setattr(train_module, "build_module", lambda *a, **k: pytest.fail("weights loaded"))
    cfg = train_cfg(tmp_path, tiny_edit_path, metadata, ["trainer=a100", "plan.gpu_gb=0.0001"])
    with pytest.raises(UserInputError, match=r"predicted to need .* GB of GPU memory"):
        train_module.train(cfg)


def test_trainer_auto_writes_the_chosen_plan_into_the_config(tmp_path, tiny_edit_path, monkeypatch):
    import fusedit.plan.config as plan_config
    from fusedit.data import make_sample_dataset
    from tests.training_utils import train_cfg

    metadata = make_sample_dataset(tmp_path / "data", n=2, size=32)
    cfg = train_cfg(tmp_path, tiny_edit_path, metadata, ["plan.gpu_gb=80"])
    assert plan_config.resolve_training_plan(cfg) is None and cfg.trainer.accelerator == "cpu"  # no GPU: the CPU
    monkeypatch.setattr(plan_config, "_gpu_run", lambda cfg: True)
    cfg = train_cfg(tmp_path, tiny_edit_path, metadata, ["plan.gpu_gb=80"])
    record = plan_config.resolve_training_plan(cfg)
    # The tiny model fits anything: the first plan in the order (bf16, everything resident, live encoders).
    assert record["fits"] and record["plan"] == TrainPlan().to_dict()
    assert cfg.precision.name == "bf16" and cfg.trainer.accelerator == "gpu" and not cfg.cache.enabled


def test_fusedit_plan_prints_the_encoding_pass_and_the_transfer_floor_at_the_given_bandwidth(
    tiny_edit_path, tmp_path, capsys
):
    from fusedit.cli import main

    overrides = [f"model.path={tiny_edit_path}", f"plan.estimates={tmp_path / 'estimates.json'}", "trainer=12gb"]
    assert (
        main(["plan", "--gpu-gb", "12", "--pcie-gbps", "pcie5_x16", "--json", str(tmp_path / "p.json"), *overrides])
        == 0
    )
    out = capsys.readouterr().out
    assert "encoding pass (offload):" in out and "at 50 GB/s" in out
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["pcie_gbps"] == 50.0 and report["encode_phase"]["mode"] == "offload"
    assert report["host_to_gpu_floor_s"] == pytest.approx(report["host_to_gpu_gb_per_step"] / 50, abs=1e-3)
    with pytest.raises(SystemExit) as refused:
        main(["plan", "--gpu-gb", "12", "--pcie-gbps", "0", *overrides])
    assert refused.value.code == 2 and "expected GB/s > 0" in capsys.readouterr().err


def test_the_ema_copy_of_the_lora_is_predicted_as_torch_holds_it():
    """callbacks=ema adds what LoRAEMA's AveragedModel really holds (its parameters and buffers, counted here) to the
    predicted peak, and the config's callbacks=ema reaches the plan."""
    from types import SimpleNamespace

    from fusedit.plan.config import config_plan
    from fusedit.training.ema import LoRAEMA

    facts = _tiny_facts(num_layers=2)
    estimates = Estimates()
    without = predict(facts, estimates, fp8=False, checkpoint_every=1, cache=True)
    with_ema = predict(facts, estimates, fp8=False, checkpoint_every=1, cache=True, ema=True)

    lora = {f"p{i}": torch.nn.Parameter(torch.zeros(n)) for i, n in enumerate((facts.lora_parameters - 5, 5))}
    ema = LoRAEMA(decay=0.9)
    ema.on_fit_start(None, SimpleNamespace(trainable_parameters=lambda: lora))
    held = [*ema.average.parameters(), *ema.average.buffers()]
    held_bytes = sum(tensor.numel() * tensor.element_size() for tensor in held)
    assert (with_ema.peak_gpu_gb - without.peak_gpu_gb) * 1e9 == pytest.approx(held_bytes, abs=1e-3)

    assert config_plan(full_cfg(["callbacks=ema"])).ema and not config_plan(full_cfg([])).ema
    assert "EMA" in choose(facts, estimates, 80, optim="adamw", ema=True).plan.describe()


def test_a_qwen21_gpu_run_is_planned_from_its_own_shapes_and_refused_when_it_will_not_fit(
    tmp_path, tiny_qwen21_path, monkeypatch
):
    """2.1's planner facts come from its own config (context_in_dim, SwiGLU, Qwen3-VL + 64-channel VAE headers), its
    step is predicted on the 2.1 model (refs + target tokens), and a run that will not fit is refused before loading."""
    import fusedit.plan.config as plan_config
    import fusedit.training.train as train_module
    import fusedit.training.validate_config as validate_config
    from fusedit.data import make_sample_dataset
    from tests.training_utils import train_cfg

    metadata = make_sample_dataset(tmp_path / "data", n=2, size=64)
    cfg = train_cfg(tmp_path, tiny_qwen21_path, metadata, ["trainer=a100", "plan.gpu_gb=0.0001"])
    facts = plan_config.config_facts(cfg, estimates=Estimates())
    assert facts.shape.family == "qwen-image-2.1" and facts.shape.mlp_ratio == 3
    assert facts.shape.reference_slots == facts.shape.image_tokens // 2 // 4  # one 64x64 reference beside the target
    assert facts.encoder_parameters > facts.vae_parameters > 0 and facts.lora_parameters > 0
    monkeypatch.setattr(plan_config, "_gpu_run", lambda cfg: True)  # as on a GPU machine
    monkeypatch.setattr(validate_config, "_check_accelerator", lambda cfg, problems: None)
    monkeypatch.setattr(train_module, "build_module", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(UserInputError, match=r"predicted to need .* GB of GPU memory"):
        train_module.train(cfg)
