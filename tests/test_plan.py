"""Training plans (fusedit.plan): the prediction, the plan chosen per card at the real shape, the profiles' fit, and
the refusal of a plan predicted not to fit before any weight loads.

The full-shape tests share one set of estimates (~1-2 min of fake-tensor runs and meta builds on 2 cores), kept in
pytest's cache directory so that later runs on the same machine reuse them."""

from __future__ import annotations

import pytest
import torch

from fusedit.bench.memory import estimate_step_memory
from fusedit.bench.shapes import SHAPES
from fusedit.bench.variants import Variant
from fusedit.errors import UserInputError
from fusedit.plan import TrainPlan, choose, plan_report
from fusedit.plan.predict import _BENCH_LORA_STEP_BYTES, Estimates, ModelFacts, model_facts, transformer_facts
from tests.training_utils import compose_train

# Issue 11's targets: predicted peak at the full shape per profile (GB), on the card it names.
PROFILE_TARGETS = {"a100": (80, 70), "h100": (80, 70), "rtx4090": (24, 22), "16gb": (16, 15), "12gb": (12, 11)}


@pytest.fixture(scope="module")
def full_estimates(request) -> Estimates:
    return Estimates(request.config.cache.mkdir("fusedit-plan") / "estimates.json")


def full_cfg(overrides):
    return compose_train([*overrides, "paths.root_dir=/tmp/unused"])


def test_depth_extrapolation_reproduces_the_full_depth_fake_run():
    """Activations per checkpoint interval k are predicted from depths k and 2k; at 6 blocks (tiny width) that must
    match the 4-block fake-tensor run (at the full shape, checked by hand for k = 0, 1, 2, 3 against the recorded
    60-block runs: 114.30, 46.71, 79.96, 91.42 GB vs 114.30, 46.70, 79.96, 91.42 in BENCHMARKS.md)."""
    shape = SHAPES["tiny"].replace(num_layers=4)
    block_bytes, other_bytes, lora = transformer_facts(shape, "merged_qkv")
    facts = ModelFacts(shape, "merged_qkv", block_bytes, other_bytes, lora, encoder_parameters=0)
    estimates = Estimates()
    for every in (1, 2):
        real = estimate_step_memory(Variant(name="v", checkpoint_every=every), shape, torch.bfloat16)["step_gb"]
        predicted = estimates.activations_gb(facts, every) + facts.lora_parameters * _BENCH_LORA_STEP_BYTES / 1e9
        # At the tiny width a few KB of per-step constants do not scale with depth (0.1 %).
        assert predicted == pytest.approx(real, rel=5e-3), every


def test_auto_picks_the_expected_plan_per_card_at_the_full_shape(full_estimates):
    facts = model_facts(SHAPES["full"], "merged_qkv", estimates=full_estimates)
    assert facts.num_blocks == 60 and facts.lora_parameters == 187_564_032
    assert facts.block_bytes["fp8"] * 2 == pytest.approx(facts.block_bytes["bf16"], rel=0.01)
    assert 8.2e9 < facts.encoder_parameters < 8.6e9  # Qwen2.5-VL-7B + the VAE
    expected = {
        80: TrainPlan(checkpoint_every=1),
        24: TrainPlan(1, fp8=True, cache=True, optim="adamw8bit", resident_blocks=41),
        16: TrainPlan(1, fp8=True, cache=True, optim="adamw8bit", resident_blocks=20, encode_on_cpu=True),
        12: TrainPlan(1, fp8=True, cache=True, optim="adamw8bit", resident_blocks=10, encode_on_cpu=True),
    }
    for gpu_gb, plan in expected.items():
        choice = choose(facts, full_estimates, gpu_gb, eight_bit=True)
        assert choice.fits and choice.plan == plan, (gpu_gb, choice.plan)
        assert choice.prediction.peak_gpu_gb <= 0.875 * gpu_gb
    streamed = choose(facts, full_estimates, 12, eight_bit=True).prediction
    assert streamed.host_gb == pytest.approx(50 * facts.block_bytes["fp8"] / 1e9)
    assert streamed.moved_gb_per_step == pytest.approx(2 * streamed.host_gb)


@pytest.mark.parametrize("profile", list(PROFILE_TARGETS))
def test_each_gpu_profile_fits_its_card_at_the_full_shape(profile, full_estimates, monkeypatch):
    monkeypatch.setattr("fusedit.plan.report.Estimates", lambda path=None: full_estimates)
    gpu_gb, target = PROFILE_TARGETS[profile]
    report = plan_report(full_cfg([f"trainer={profile}"]), "full", gpu_gb)
    assert report["fits"] and report["predicted_peak_gpu_gb"] <= target, report
    assert report["shape"]["num_layers"] == 60 and report["shape"]["image_tokens"] == 8192


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
