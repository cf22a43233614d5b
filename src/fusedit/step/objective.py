"""Qwen-Image's rectified-flow objective: which noise level to train on, how to noise, what to predict, the loss.

With clean latents x0, Gaussian noise eps and noise level s in (0, 1]:

    x_s = (1 - s) * x0 + s * eps          target = eps - x0          loss = w(s) * mean((v_pred - target)^2)

The transformer receives `timestep = s` (the pipeline passes `t / 1000` with `t = 1000 s`). The mean runs over
the *target image tokens only*; the edit-image tokens appended to the sequence are conditioning.

The noise-level schedules are diffusers' `FlowMatchEulerDiscreteScheduler` math (its `set_timesteps` with `mu`:
exponential `time_shift` then `stretch_shift_to_terminal`), built from the pipeline's own scheduler config, so
training and inference share one definition. See docs/training.md for the choices and defaults.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling

SAMPLING_CHOICES = ("shifted_uniform", "dynamic_shift", "logit_normal")
WEIGHTING_CHOICES = ("none", "bell")

# Qwen-Image's scheduler/scheduler_config.json (FlowMatchEulerDiscreteScheduler): the objective's default when no
# pipeline config is given, and the scheduler of the tiny pipelines (fusedit.tiny).
QWEN_SCHEDULER_CONFIG = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}


def calculate_shift(image_seq_len: int, config: dict) -> float:
    """Resolution-dependent mu, as the Qwen-Image pipelines compute it for inference (linear in token count)."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift as _calculate_shift

    return _calculate_shift(
        image_seq_len,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )


class FlowMatchObjective:
    """Samples noise levels, noises latents and computes the (weighted) flow-matching loss.

    sampling:
      shifted_uniform  uniform over the 1000 training noise levels of the Qwen schedule shifted with a fixed
                       `mu` and stretched to `shift_terminal` (DiffSynth-Studio's Qwen-Image training).
      dynamic_shift    the same, with `mu` from the image token count as at inference for that resolution.
      logit_normal     s = sigmoid(N(logit_mean, logit_std)) (SD3; diffusers' Qwen-Image LoRA script default).
    weighting:
      none             every noise level counts the same.
      bell             DiffSynth's bell curve exp(-2 ((1000 s - 500) / 1000)^2), shifted to zero at its minimum
                       and normalised to mean 1 over the training schedule.
    """

    def __init__(
        self,
        sampling: str = "shifted_uniform",
        weighting: str = "bell",
        mu: float = 0.8,
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        num_train_timesteps: int = 1000,
        scheduler_config: dict | None = None,
        mask_from_edit: bool = False,
        mask_from_edit_floor: float = 0.1,
    ):
        if sampling not in SAMPLING_CHOICES:
            raise ValueError(f"objective.sampling must be one of {SAMPLING_CHOICES}, got {sampling!r}")
        if weighting not in WEIGHTING_CHOICES:
            raise ValueError(f"objective.weighting must be one of {WEIGHTING_CHOICES}, got {weighting!r}")
        if logit_std <= 0:
            raise ValueError(f"objective.logit_std must be > 0, got {logit_std}")
        if num_train_timesteps < 2:
            raise ValueError(f"objective.num_train_timesteps must be >= 2, got {num_train_timesteps}")
        if not 0.0 <= mask_from_edit_floor <= 1.0:
            raise ValueError(f"objective.mask_from_edit_floor must be in [0, 1], got {mask_from_edit_floor}")
        self.mask_from_edit = bool(mask_from_edit)
        self.mask_from_edit_floor = float(mask_from_edit_floor)
        self.sampling = sampling
        self.weighting = weighting
        self.mu = float(mu)
        self.logit_mean = float(logit_mean)
        self.logit_std = float(logit_std)
        self.num_train_timesteps = int(num_train_timesteps)
        config = dict(QWEN_SCHEDULER_CONFIG)
        config.update({key: value for key, value in (scheduler_config or {}).items() if not key.startswith("_")})
        # Training always shifts exponentially by mu; the pipeline config's shift_terminal is kept.
        config.update(use_dynamic_shifting=True, time_shift_type="exponential")
        self.scheduler_config = config
        # The schedule cache key, fixed with the config: sample_sigmas looks the table up for every sample.
        self._config_json = json.dumps(config, sort_keys=True, default=str)
        self._bell_table = self._bell(self.schedule(self.mu))

    # -- schedules -------------------------------------------------------------------------------------------------
    def schedule(self, mu: float) -> torch.Tensor:
        """The `num_train_timesteps` training noise levels (descending, terminal 0 dropped) for `mu`."""
        return _schedule(self.num_train_timesteps, round(float(mu), 6), self._config_json)

    def mu_for(self, image_seq_len: int) -> float:
        if self.sampling == "dynamic_shift":
            return calculate_shift(image_seq_len, self.scheduler_config)
        return self.mu

    def sample_sigmas(self, batch_size: int, image_seq_len: int, generator: torch.Generator) -> torch.Tensor:
        """Noise levels s in (0, 1] for a batch (float32, CPU); `generator` must be a CPU generator."""
        if self.sampling == "logit_normal":
            return compute_density_for_timestep_sampling(
                "logit_normal",
                batch_size,
                logit_mean=self.logit_mean,
                logit_std=self.logit_std,
                generator=generator,
            ).float()
        table = self.schedule(self.mu_for(image_seq_len))
        index = torch.randint(0, len(table), (batch_size,), generator=generator)
        return table[index]

    # -- weighting -------------------------------------------------------------------------------------------------
    def _bell(self, table: torch.Tensor) -> tuple[float, float]:
        curve = torch.exp(-2 * ((table * 1000 - 500) / 1000) ** 2)
        floor = curve.min().item()
        return floor, (curve - floor).mean().item()

    def weights(self, sigmas: torch.Tensor) -> torch.Tensor:
        if self.weighting == "none":
            return torch.ones_like(sigmas)
        floor, mean = self._bell_table
        return (torch.exp(-2 * ((sigmas * 1000 - 500) / 1000) ** 2) - floor) / mean

    # -- the objective ---------------------------------------------------------------------------------------------
    @staticmethod
    def noisy(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        s = sigmas.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
        return (1 - s) * x0 + s * noise

    @staticmethod
    def target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise - x0

    def loss(
        self,
        prediction: torch.Tensor,
        target: torch.Tensor,
        sigmas: torch.Tensor,
        token_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Weighted MSE in float32: per-sample mean over tokens and channels, then mean over the batch.

        token_weights [B, tokens] (a loss mask, fusedit.step.token_weights): the per-sample mean over tokens is the
        masked mean sum_t w_t e_t / sum_t w_t (a sample with no weight at all contributes 0)."""
        squared = (prediction.float() - target.float()).pow(2)
        if token_weights is None:
            per_sample = squared.flatten(1).mean(1)
        else:
            weights = token_weights.to(squared.device, torch.float32)
            per_token = squared.mean(-1)
            per_sample = (per_token * weights).sum(1) / weights.sum(1).clamp_min(torch.finfo(torch.float32).tiny)
        return (per_sample * self.weights(sigmas).to(per_sample.device)).mean()


@lru_cache(maxsize=64)
def _schedule(num_train_timesteps: int, mu: float, config_json: str) -> torch.Tensor:
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(json.loads(config_json))
    scheduler.set_timesteps(num_train_timesteps, mu=mu)
    sigmas = scheduler.sigmas[:-1].float()
    if not math.isfinite(sigmas.sum().item()) or sigmas.min() <= 0:
        raise ValueError(f"noise schedule for mu={mu} is degenerate (min {sigmas.min().item()})")
    return sigmas
