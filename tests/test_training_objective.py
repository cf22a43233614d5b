"""The flow-matching objective: the schedules are Qwen-Image's (DiffSynth's training table, the pipeline's shift),
the weighting is normalised, and the noising/target/loss follow the rectified-flow definitions."""

from __future__ import annotations

import math

import pytest
import torch

from fusedit.step.objective import QWEN_SCHEDULER_CONFIG as SCHEDULER_CONFIG
from fusedit.step.objective import FlowMatchObjective, calculate_shift


def diffsynth_table(mu: float, shift_terminal: float = 0.02) -> torch.Tensor:
    # DiffSynth-Studio's Qwen-Image training schedule, written out from its definition.
    sigmas = torch.linspace(1.0, 0.0, 1001)[:-1]
    sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
    one_minus = 1 - sigmas
    return 1 - one_minus / (one_minus[-1] / (1 - shift_terminal))


def test_shifted_uniform_is_the_diffsynth_schedule():
    objective = FlowMatchObjective(scheduler_config=SCHEDULER_CONFIG)
    table = objective.schedule(0.8)
    torch.testing.assert_close(table, diffsynth_table(0.8), rtol=0, atol=1e-6)
    assert table[0] == pytest.approx(1.0) and table[-1] == pytest.approx(0.02)
    sigmas = objective.sample_sigmas(4096, 1024, torch.Generator().manual_seed(0))
    assert set(sigmas.tolist()) <= set(table.tolist())


def test_dynamic_shift_follows_the_resolution():
    objective = FlowMatchObjective("dynamic_shift", scheduler_config=SCHEDULER_CONFIG)
    assert objective.mu_for(256) == pytest.approx(0.5) and objective.mu_for(8192) == pytest.approx(0.9)
    assert calculate_shift(4096, SCHEDULER_CONFIG) == pytest.approx(objective.mu_for(4096))
    low = objective.sample_sigmas(20000, 256, torch.Generator().manual_seed(0)).mean()
    high = objective.sample_sigmas(20000, 8192, torch.Generator().manual_seed(0)).mean()
    assert high > low  # more tokens -> more weight on high noise, as at inference


def test_logit_normal_sampling():
    objective = FlowMatchObjective("logit_normal", logit_mean=0.0, logit_std=1.0)
    sigmas = objective.sample_sigmas(20000, 1024, torch.Generator().manual_seed(0))
    assert sigmas.min() > 0 and sigmas.max() < 1
    assert sigmas.median() == pytest.approx(0.5, abs=0.02)


def test_weighting():
    bell = FlowMatchObjective(weighting="bell")
    table = bell.schedule(0.8)
    weights = bell.weights(table)
    assert weights.mean() == pytest.approx(1.0, rel=1e-5) and weights.min() == pytest.approx(0.0, abs=1e-6)
    assert bell.weights(torch.tensor([0.5])) > bell.weights(torch.tensor([0.98]))
    assert torch.equal(FlowMatchObjective(weighting="none").weights(table), torch.ones_like(table))


def test_noising_target_and_loss():
    objective = FlowMatchObjective(weighting="none")
    x0, noise = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    sigmas = torch.tensor([0.0, 1.0])
    noisy = objective.noisy(x0, noise, sigmas)
    torch.testing.assert_close(noisy[0], x0[0])
    torch.testing.assert_close(noisy[1], noise[1])
    target = objective.target(x0, noise)
    torch.testing.assert_close(target, noise - x0)
    # The exact velocity has zero loss; an error of 1 everywhere has loss 1.
    assert objective.loss(target, target, sigmas).item() == 0
    assert objective.loss(target + 1, target, sigmas).item() == pytest.approx(1.0)


def test_bad_choices_are_refused():
    with pytest.raises(ValueError, match="sampling"):
        FlowMatchObjective("uniform")
    with pytest.raises(ValueError, match="weighting"):
        FlowMatchObjective(weighting="sigma_sqrt")
