"""The training plan of a composed `train.py` config: read it, predict it, choose one (`trainer=auto`), refuse one.

`resolve_training_plan(cfg)` runs in `train(cfg)` after the config checks and before any weight is loaded:
- on a CPU run it does nothing (trainer=auto picks the CPU);
- with `plan.auto=true` (trainer=auto) on a GPU it chooses the fastest plan predicted to fit (fusedit.plan.choose)
  and writes its five keys into `cfg`;
- otherwise it predicts the config's own plan and raises UserInputError when it is predicted not to fit, naming
  the predicted peak and the overrides of the first plan that fits.
"""

from __future__ import annotations

import dataclasses
import logging

from omegaconf import DictConfig, OmegaConf, open_dict

from fusedit.errors import UserInputError
from fusedit.plan.choose import MARGIN, Choice, TrainPlan, choose, evaluate, fits
from fusedit.plan.predict import (
    FULL,
    FULL_BY_FAMILY,
    Estimates,
    ModelFacts,
    model_facts,
    pipeline_shape,
    training_shape,
)
from fusedit.step.precision import PRESETS, Precision
from fusedit.train_config import CONF_DIR

log = logging.getLogger(__name__)


def config_plan(cfg: DictConfig) -> TrainPlan:
    """The plan `cfg` asks for (the five switches of fusedit.plan.choose)."""
    precision = cfg.precision
    return TrainPlan(
        checkpoint_every=int(cfg.model.get("activation_checkpointing") or 0),
        fp8=precision.get("fp8", "none") != "none",
        fp32=precision.get("fp8", "none") == "none" and precision.get("base_dtype") == "float32",
        cache=bool(cfg.get("cache") and cfg.cache.get("enabled")),
        optim=str(cfg.optim.get("name", "adamw")),
        resident_blocks=cfg.model.get("resident_blocks"),
        encode=_encode_mode(cfg),
        ema=bool(cfg.get("callbacks") and cfg.callbacks.get("ema")),
    )


def _encode_mode(cfg: DictConfig) -> str:
    """Where the config's cache fills itself: "cpu" (cache.device=cpu), "offload" (cache.offload) or "gpu"."""
    cache = cfg.get("cache") or {}
    if cache.get("device") == "cpu":
        return "cpu"
    return "offload" if cache.get("offload") else "gpu"


def _largest_bucket(cfg: DictConfig) -> tuple[tuple[int, int], tuple[tuple[int, int], ...]]:
    """(target size, edit sizes) of the bucket with the most tokens the data will produce (the data plan: every
    row's resize, from image headers; nothing is decoded)."""
    from hydra.utils import instantiate

    datamodule = instantiate(cfg.data)
    datamodule.setup()
    sizes = datamodule.train_dataset.sizes
    if not sizes:
        raise UserInputError(f"data.metadata={cfg.data.metadata}: no training rows to plan for")

    def tokens(key):
        target, edits = key
        return sum(width * height for width, height in (target, *edits))

    return max(sizes, key=tokens)


def _targets(cfg: DictConfig):
    targets = cfg.lora.targets
    return tuple(OmegaConf.to_object(targets)) if OmegaConf.is_config(targets) else str(targets)


def _full_family(cfg: DictConfig, family: str | None) -> str:
    """The family `--size full` plans for: `family` if given, else model.path's when it is a pipeline folder."""
    if family is not None:
        return family
    from pathlib import Path

    from fusedit.families import QWEN_IMAGE_21, folder_family

    path = cfg.model.get("path")
    if path and (Path(str(path)) / "model_index.json").is_file() and folder_family(str(path)) == QWEN_IMAGE_21:
        return QWEN_IMAGE_21
    return FULL.family


def config_facts(
    cfg: DictConfig, size: str | None = None, estimates: Estimates | None = None, family: str | None = None
) -> ModelFacts:
    """Model facts for `cfg`: `size="full"`: the real shapes at 1024x1024 + one 1024x1024 edit image, no files, of
    Qwen-Image-Edit or, with `family="qwen-image-2.1"` (or a 2.1 model.path), Qwen-Image-2.1 (32 blocks of 4096,
    Qwen3-VL-8B, its 64-channel VAE); else the pipeline at `model.path` (configs and safetensors headers, either
    family) at the data's largest bucket."""
    layout = cfg.model.layout
    batch = int(cfg.data.batch_size)
    if size == "full":
        full = FULL_BY_FAMILY[_full_family(cfg, family)]
        shape = training_shape(full, full.target_size, full.edit_sizes, batch, int(cfg.lora.rank), _targets(cfg))
        return model_facts(shape, layout, None, estimates)
    target, edits = _largest_bucket(cfg)
    base = pipeline_shape(cfg.model.path, FULL)
    shape = training_shape(base, target, edits, batch, int(cfg.lora.rank), _targets(cfg))
    return model_facts(shape, layout, cfg.model.path, estimates)


def apply_plan(cfg: DictConfig, plan: TrainPlan) -> None:
    """Write `plan`'s switches into `cfg` (the precision and optim groups' YAML files, as `precision=fp8` would)."""
    with open_dict(cfg):
        # The precision=fp8 / bf16 / fp32 presets (fusedit.step.precision.PRESETS, equal to conf/precision/).
        preset = PRESETS[plan.precision]
        cfg.precision = OmegaConf.create(
            {"_target_": f"{Precision.__module__}.Precision", **dataclasses.asdict(preset)}
        )
        cfg.model.activation_checkpointing = plan.checkpoint_every
        cfg.model.resident_blocks = plan.resident_blocks
        cfg.cache.enabled = plan.cache
        if plan.cache and plan.encode == "cpu":
            cfg.cache.device = "cpu"
        cfg.cache.offload = plan.cache and plan.encode == "offload"
        if plan.optim != cfg.optim.get("name", "adamw"):
            group = OmegaConf.load(CONF_DIR / "optim" / f"{plan.optim}.yaml")
            group.pop("defaults", None)
            cfg.optim = OmegaConf.merge(OmegaConf.load(CONF_DIR / "optim" / "adamw.yaml"), group)
        cfg.trainer.accelerator = "gpu"
        cfg.trainer.devices = 1


def _gpu_run(cfg: DictConfig) -> bool:
    import torch

    accelerator = str(cfg.trainer.get("accelerator", "cpu"))
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def detected_gpu_gb() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 1e9


def resolve_training_plan(cfg: DictConfig) -> dict | None:
    """Choose (trainer=auto) or check the plan of a GPU run before any weight loads; returns the record written to
    the run log (None on a CPU run or when `plan.check=false`). Raises UserInputError for a plan predicted not to
    fit."""
    settings = cfg.get("plan") or {}
    auto = bool(settings.get("auto", False))
    if not _gpu_run(cfg):
        if auto:
            with open_dict(cfg):
                cfg.trainer.accelerator = "cpu"
            print("fusedit: plan: no CUDA GPU, training on the CPU", flush=True)
        return None
    if not auto and not settings.get("check", True):
        return None
    devices = cfg.trainer.get("devices", 1)
    if devices not in (1, "1") or cfg.trainer.get("strategy") is not None:
        log.info("plan: memory is predicted for one GPU; not checked for trainer.devices=%s", devices)
        return None
    gpu_gb = settings.get("gpu_gb") or detected_gpu_gb()
    estimates = Estimates(settings.get("estimates"))
    facts = config_facts(cfg, estimates=estimates)
    asked = config_plan(cfg)
    if auto:
        choice = choose(facts, estimates, float(gpu_gb), optim=asked.optim, ema=asked.ema)
        if not choice.fits:
            raise UserInputError(_no_plan_message(choice))
        apply_plan(cfg, choice.plan)
        print(_chosen_message(choice), flush=True)
    else:
        choice = evaluate(asked, facts, estimates, float(gpu_gb))
        if not choice.fits:
            fitting = choose(facts, estimates, float(gpu_gb), optim=asked.optim, ema=asked.ema)
            raise UserInputError(_refusal_message(choice, fitting))
    record = {"auto": auto, **choice.to_dict()}
    log.info("plan: %s", record)
    return record


def _chosen_message(choice: Choice) -> str:
    return (
        f"fusedit: plan: {choice.plan.describe()}; predicted peak {choice.prediction.peak_gpu_gb:.1f} GB of "
        f"{choice.gpu_gb:.1f} GB (budget {MARGIN * choice.gpu_gb:.1f} GB), host {choice.prediction.host_gb:.1f} GB "
        f"[{' '.join(choice.plan.overrides())}]"
    )


def _no_plan_message(choice: Choice) -> str:
    return (
        f"no training plan is predicted to fit this {choice.gpu_gb:.1f} GB GPU: even {choice.plan.describe()} "
        f"needs {choice.prediction.peak_gpu_gb:.1f} GB (budget {MARGIN * choice.gpu_gb:.1f} GB); lower "
        "data.max_pixels or lora.rank"
    )


def _refusal_message(choice: Choice, fitting: Choice) -> str:
    card = f"the GPU has {choice.gpu_gb:.1f} GB (budget {MARGIN * choice.gpu_gb:.1f} GB)"
    if choice.encode is not None and not choice.encode.fits and fits(choice.prediction, choice.gpu_gb):
        head = (
            f"this run's encoding pass (encode-then-train, encoders {choice.encode.mode}: "
            f"{choice.plan.describe()}) is predicted to need "
            f"{choice.encode.peak_gpu_gb:.1f} GB of GPU memory but {card}"
        )
    else:
        head = (
            f"this run is predicted to need {choice.prediction.peak_gpu_gb:.1f} GB of GPU memory "
            f"({choice.plan.describe()}) but {card}"
        )
    if not fitting.fits:
        return head + "; no plan is predicted to fit: lower data.max_pixels or lora.rank"
    current = set(choice.plan.overrides())
    change = [item for item in fitting.plan.overrides() if item not in current]
    return (
        f"{head}; predicted to fit ({fitting.prediction.peak_gpu_gb:.1f} GB) with: {' '.join(change)} "
        "(or trainer=auto; plan.check=false skips this check)"
    )
