"""Check a composed training config before anything heavy is loaded: one clear message per mistake.

Hydra already refuses unknown groups, options and keys (with the valid choices). What it cannot know is that a
rank of 0, a negative learning rate, a misspelt LoRA target, a model folder that is not a Qwen-Image-Edit pipeline
or a missing metadata file would each fail minutes later, deep inside model loading or the first step, as a wall of
stack trace. `validate_train_config` finds all of them in milliseconds and raises one `ConfigError` listing every
problem; `python train.py` prints it as a single error without a traceback (see train.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fusedit.errors import UserInputError
from fusedit.families import (
    EDIT,
    EDIT_2509,
    EDIT_2511,
    QWEN_IMAGE_21,
    TEXT_TO_IMAGE,
    is_edit_family,
    needs_edit_image,
)
from fusedit.regular_files import not_regular_reason
from fusedit.step.config import typed_configs


class ConfigError(UserInputError):
    """The training config cannot work; the message names every offending key."""


def _number(cfg: DictConfig, key: str):
    value = OmegaConf.select(cfg, key)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# The families training runs (fusedit.families).
TRAINED_FAMILIES = (TEXT_TO_IMAGE, EDIT, EDIT_2509, EDIT_2511, QWEN_IMAGE_21)
# The model's family could not be told (no file checks, or an unreadable folder): either family's LoRA target names
# pass.
_UNKNOWN = "unknown"


def _check_model(path: str, problems: list[str]) -> None:
    from fusedit.detect import detect

    location = Path(path).expanduser()
    if not location.exists():
        problems.append(f"model.path={path} does not exist")
        return
    try:
        report = detect(location)
    except (ValueError, OSError) as error:
        problems.append(f"model.path={path} is not a Qwen-Image model: fusedit detect says: {error}")
        return
    kind, family = report.get("kind"), report.get("family")
    if kind != "pipeline":
        what = f"a {kind}" + (f" ({family})" if family else "")
        problems.append(
            f"model.path={path} is {what}, but training needs a Qwen-Image(-Edit) pipeline folder "
            "(model_index.json with transformer/, vae/, text_encoder/, tokenizer/; processor/ for the edit models)"
        )
    elif family not in TRAINED_FAMILIES:
        problems.append(
            f"model.path={path} is a {family} pipeline ({report.get('pipeline_class')}); fusedit trains LoRAs for "
            "Qwen-Image (text-to-image, also -2512), Qwen-Image-Edit (-2509, -2511) and Qwen-Image-2.1"
        )


def _model_family(cfg: DictConfig) -> str | None:
    """The family (fusedit.families) of `model.path` from its JSON files, or None when it cannot be told (null:
    the tiny edit demo; a bad folder is reported by `_check_model`)."""
    from fusedit.families import folder_family

    path = OmegaConf.select(cfg, "model.path")
    if path is None:
        return EDIT  # fill_demo_paths: the tiny Qwen-Image-Edit pipeline
    try:
        return folder_family(Path(str(path)).expanduser())
    except (ValueError, OSError):
        return None


def _check_validation_samples(cfg: DictConfig, check_paths: bool, problems: list[str]) -> None:
    """`callbacks.validation_images.samples`: each {edit_image: path or [paths], prompt, image: optional target};
    a text-to-image model's samples have no edit_image."""
    key = "callbacks.validation_images"
    samples = OmegaConf.select(cfg, f"{key}.samples")
    if not samples:
        return
    if OmegaConf.select(cfg, "cache.enabled"):
        problems.append(f"{key}.samples needs the text encoder, which cache.enabled=true does not load")
    # The model's family says whether samples take an edit image; unknown (no file checks), either form passes.
    family = _model_family(cfg) if check_paths or OmegaConf.select(cfg, "model.path") is None else None
    base = Path(str(OmegaConf.select(cfg, f"{key}.base_path") or ".")).expanduser()
    for index, sample in enumerate(samples):
        where = f"{key}.samples[{index}]"
        if not OmegaConf.is_dict(sample):
            problems.append(f"{where} must be {{edit_image: ..., prompt: ...}}, got {sample!r}")
            continue
        unknown = sorted(set(sample) - {"edit_image", "prompt", "image"})
        if unknown:
            problems.append(f"{where} has unknown key(s) {unknown}; use edit_image, prompt and optionally image")
        if not isinstance(sample.get("prompt"), str) or not sample.get("prompt", "").strip():
            problems.append(f"{where}.prompt must be a non-empty text")
        edit = sample.get("edit_image")
        paths = [edit] if isinstance(edit, str) else list(edit) if OmegaConf.is_list(edit) else None
        if family is not None and not is_edit_family(family) and edit is not None:
            problems.append(
                f"{where}.edit_image: model.path is Qwen-Image (text-to-image), which takes no input image; "
                "give {prompt: ..., image: optional target}"
            )
            continue
        # Qwen-Image-2.1 takes a sample with or without references (edit_image).
        needs_edit = family is not None and needs_edit_image(family)
        if (edit is None and needs_edit) or (edit is not None and not paths):
            problems.append(f"{where}.edit_image must be an image path or a list of them, got {edit!r}")
            continue
        paths = paths or []
        if not check_paths:
            continue
        from fusedit.data.validation import check_image

        max_pixels = OmegaConf.select(cfg, "data.max_image_pixels") or 50_000_000
        named = [("edit_image", p) for p in paths] + ([("image", sample["image"])] if sample.get("image") else [])
        for field, path in named:
            try:
                check_image(base / str(path), int(max_pixels))
            except ValueError as error:
                problems.append(f"{where}.{field} {base / str(path)}: {error}")


def _adapter_type_problems(cfg: DictConfig) -> list[str]:
    """`lora.type` (fusedit.lora.choices.check_type) and what DoRA, LoKr and LoHa cannot be combined with."""
    from fusedit.lora.choices import changes_base, check_type, lycoris_problems

    adapter_type = OmegaConf.select(cfg, "lora.type", default="lora")
    try:
        check_type(adapter_type)
    except ValueError as error:
        return [str(error)]
    export = OmegaConf.select(cfg, "callbacks.lora_export", default=None)
    factor = OmegaConf.select(cfg, "lora.decompose_factor", default=-1)
    if not isinstance(factor, int) or isinstance(factor, bool) or not (factor == -1 or factor >= 1):
        return [f"lora.decompose_factor must be -1 or an integer >= 1, got {factor!r}"]
    if factor != -1 and adapter_type != "lokr":
        return [f"lora.decompose_factor is LoKr's: set lora.type=lokr or leave it at -1 (lora.type={adapter_type})"]
    if adapter_type != "dora":
        layouts = () if export is None else (export.get("layout", "standard"), export.get("merged_copy") and "merged")
        return lycoris_problems(
            adapter_type,
            OmegaConf.select(cfg, "lora.init"),
            OmegaConf.select(cfg, "lora.init_from"),
            _number(cfg, "lora.dropout"),
            OmegaConf.select(cfg, "lora.use_rslora"),
            OmegaConf.select(cfg, "precision.fp8", default="none"),
            [layout for layout in layouts if layout],
        )
    problems = []
    if changes_base(OmegaConf.select(cfg, "lora.init")) or OmegaConf.select(cfg, "lora.init_from"):
        problems.append(
            "lora.type=dora starts its magnitude from the base weight: not with lora.init=pissa/olora or lora.init_from"
        )
    if OmegaConf.select(cfg, "precision.fp8", default="none") != "none":
        problems.append("lora.type=dora reads the frozen weight for its row norms: use precision=bf16 or fp32, not fp8")
    return problems


def _lokr_split_problems(cfg: DictConfig, family: str | None) -> list[str]:
    """lora.type=lokr on the merged to_qkv / add_qkv_proj: refused from the transformer's config.json, before the
    model loads, when the update would not split exactly into q/k/v (fusedit.lora.lycoris). Imports PEFT (and
    torch), so it runs last and for LoKr only; Qwen-Image-2.1 is checked when the adapter is added."""
    if OmegaConf.select(cfg, "lora.type") != "lokr" or OmegaConf.select(cfg, "model.layout") != "merged_qkv":
        return []
    if family == QWEN_IMAGE_21:
        return []
    path = OmegaConf.select(cfg, "model.path")
    try:
        config = json.loads((Path(str(path)).expanduser() / "transformer" / "config.json").read_text())
        inner = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    except (OSError, ValueError, KeyError, TypeError):
        return []  # no readable MMDiT config (model.path null: the demo; 2.1): checked when the adapter is added
    from fusedit.lora.lycoris import split_refusal, w1_rows
    from fusedit.lora.targets import resolve_targets
    from fusedit.model.module_map import QKV_GROUPS

    targets = OmegaConf.select(cfg, "lora.targets")
    targets = OmegaConf.to_object(targets) if OmegaConf.is_config(targets) else targets
    factor = OmegaConf.select(cfg, "lora.decompose_factor", default=-1)
    rows = w1_rows(3 * inner, factor)
    for leaf in (name for name in resolve_targets(targets, "merged_qkv") if name in QKV_GROUPS):
        refusal = split_refusal(f"attn.{leaf}", 3 * inner, QKV_GROUPS[leaf], rows)
        if refusal:
            return [refusal]
    return []


def _lora_problems(cfg: DictConfig, family: str) -> list[str]:
    """lora.*: `family` (fusedit.families, or _UNKNOWN) says which transformer's target names apply."""
    problems = []
    rank = OmegaConf.select(cfg, "lora.rank")
    rank_bad = not isinstance(rank, int) or isinstance(rank, bool) or rank < 1
    if rank_bad:
        problems.append(f"lora.rank must be an integer >= 1, got {rank!r}")
    alpha = _number(cfg, "lora.alpha")
    # lora.alpha defaults to ${.rank}: a bad rank would be reported twice, once under its own name and once as alpha.
    alpha_is_rank = rank_bad and "alpha" in cfg.lora and OmegaConf.is_interpolation(cfg.lora, "alpha")
    if not alpha_is_rank and (alpha is None or not (math.isfinite(alpha) and alpha > 0)):
        problems.append(f"lora.alpha must be a finite number > 0, got {OmegaConf.select(cfg, 'lora.alpha')!r}")
    dropout = _number(cfg, "lora.dropout")
    if dropout is None or not 0.0 <= dropout < 1.0:
        problems.append(f"lora.dropout must be in [0, 1), got {OmegaConf.select(cfg, 'lora.dropout')!r}")
    init = OmegaConf.select(cfg, "lora.init")
    try:
        from fusedit.lora.choices import changes_base, check_init

        check_init(init)
        if changes_base(init) and OmegaConf.select(cfg, "precision.fp8", default="none") != "none":
            problems.append(
                f"lora.init={init} subtracts the adapter's start from the base weight, which fp8 storage cannot hold "
                "exactly: use precision=bf16 or fp32"
            )
        if changes_base(init) and OmegaConf.select(cfg, "lora.init_from"):
            problems.append(f"lora.init={init} starts from the base weight's own factors: not with lora.init_from")
    except ValueError as error:
        problems.append(str(error))
    problems += _adapter_type_problems(cfg)
    problem = _targets_problem(cfg, family)
    if problem:
        problems.append(problem)
    return problems


def _targets_problem(cfg: DictConfig, family: str) -> str | None:
    """`lora.targets` checked against the names of `family`'s transformer (fusedit.lora.targets.resolve_targets:
    Qwen-Image-2.1's own Linears, or the MMDiT's), so a 2.1 name on the MMDiT, an MMDiT name on 2.1 or a misspelt
    one is refused before anything loads."""
    from fusedit.lora.targets import resolve_targets

    targets = OmegaConf.select(cfg, "lora.targets")
    targets = OmegaConf.to_object(targets) if OmegaConf.is_config(targets) else targets
    errors = []
    for candidate in (TEXT_TO_IMAGE, QWEN_IMAGE_21) if family == _UNKNOWN else (family,):
        try:
            resolve_targets(targets, cfg.model.layout, candidate)
            return None
        except ValueError as error:
            errors.append(error)
    return f"lora.targets: {errors[0]}"


def _optimizer_problems(cfg: DictConfig) -> list[str]:
    """The optimizer's package, and the combinations it cannot run (fusedit.optim, fusedit.training.ema)."""
    from fusedit.optim import missing_package_hint

    problems = []
    name = OmegaConf.select(cfg, "optim.name")
    hint = missing_package_hint(str(name))
    if hint:
        problems.append(hint)
    ema = OmegaConf.select(cfg, "callbacks.ema")
    if name == "schedulefree":
        schedule = OmegaConf.select(cfg, "optim.scheduler.name")
        if schedule != "constant":
            problems.append(
                f"optim=schedulefree replaces the LR decay by averaging: optim.scheduler.name must be constant (with "
                f"optional warmup_steps), got {schedule!r}"
            )
        if ema is not None:
            problems.append(
                "callbacks=ema with optim=schedulefree: the schedule-free optimizer already averages its iterates "
                "(its exports are the average); use one of the two"
            )
    decay = OmegaConf.select(cfg, "callbacks.ema.decay", default=None)
    if ema is not None and not (isinstance(decay, (int, float)) and not isinstance(decay, bool) and 0 <= decay < 1):
        problems.append(f"callbacks.ema.decay must be a number in [0, 1), got {decay!r}")
    if ema is not None and "FSDP" in str(OmegaConf.select(cfg, "trainer.strategy._target_", default="")):
        problems.append("callbacks=ema is not supported with trainer=fsdp: each rank would average its own shard")
    return problems


def _loop_problems(cfg: DictConfig) -> list[str]:
    """The optimizer, the trainer's loop, the batch size and the fault budget."""
    problems = []
    lr = _number(cfg, "optim.lr")
    if lr is None or not (math.isfinite(lr) and lr > 0):
        problems.append(f"optim.lr must be a finite number > 0, got {OmegaConf.select(cfg, 'optim.lr')!r}")
    weight_decay = _number(cfg, "optim.weight_decay")
    if weight_decay is None or not (math.isfinite(weight_decay) and weight_decay >= 0):
        problems.append(
            f"optim.weight_decay must be a finite number >= 0, got {OmegaConf.select(cfg, 'optim.weight_decay')!r}"
        )
    clip = OmegaConf.select(cfg, "optim.grad_clip")
    if clip is not None and (_number(cfg, "optim.grad_clip") is None or not clip > 0):
        problems.append(f"optim.grad_clip must be > 0 or null (off), got {clip!r}")

    problems += _optimizer_problems(cfg)

    seed = OmegaConf.select(cfg, "seed")
    # numpy's and torch's generators take seeds in [0, 2**32): Lightning's seed_everything warns and replaces
    # anything else with a random seed, so the run would not be reproducible from its config.
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        problems.append(f"seed must be an integer in [0, 2**32), got {seed!r}")
    max_steps = OmegaConf.select(cfg, "trainer.max_steps")
    max_epochs = OmegaConf.select(cfg, "trainer.max_epochs")
    if not isinstance(max_steps, int) or (max_steps < 1 and max_steps != -1):
        problems.append(f"trainer.max_steps must be >= 1 (or -1 with trainer.max_epochs), got {max_steps!r}")
    elif max_steps == -1 and not (isinstance(max_epochs, int) and max_epochs >= 1):
        problems.append(
            f"trainer.max_steps=-1 needs trainer.max_epochs >= 1 (got {max_epochs!r}): with both unbounded the run "
            "never ends"
        )
    batch_size = OmegaConf.select(cfg, "data.batch_size")
    if not isinstance(batch_size, int) or batch_size < 1:
        problems.append(f"data.batch_size must be an integer >= 1, got {batch_size!r}")
    accumulate = OmegaConf.select(cfg, "trainer.accumulate_grad_batches")
    if accumulate is not None and (not isinstance(accumulate, int) or accumulate < 1):
        problems.append(f"trainer.accumulate_grad_batches must be an integer >= 1, got {accumulate!r}")
    streak = OmegaConf.select(cfg, "faults.max_consecutive_nonfinite")
    if streak is not None and (not isinstance(streak, int) or streak < 1):
        problems.append(f"faults.max_consecutive_nonfinite must be an integer >= 1, got {streak!r}")
    return problems


def _data_source_problems(cfg: DictConfig) -> list[str]:
    """data.format and its settings, data.caption_dropout: what EditDataModule refuses when it is built, as one line
    before anything is (fusedit.data.sources)."""
    from fusedit.data.sources import refuse_bad_source

    data = cfg.get("data")
    if data is None or "format" not in data:
        return []
    problems = []
    dropout = data.get("caption_dropout", 0.0)
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout <= 1.0:
        problems.append(f"data.caption_dropout must be in [0, 1], got {dropout!r}")
    if data.format == "metadata" and data.get("metadata") is None:
        return problems  # the generated sample data (fusedit.data.sample.fill_demo_paths)
    try:
        refuse_bad_source(data)
    except ValueError as error:
        problems.append(str(error))
    return problems


def _path_problems(cfg: DictConfig, earlier: list[str], family: str | None = None) -> list[str]:
    """model.path, data.metadata, ckpt_path and lora.init_from (not read when `earlier` problems name lora.*)."""
    problems: list[str] = []
    model_path = OmegaConf.select(cfg, "model.path")
    if model_path is not None:
        _check_model(str(model_path), problems)
    metadata = OmegaConf.select(cfg, "data.metadata")
    if metadata is not None:
        reason = not_regular_reason(Path(str(metadata)).expanduser())  # never opened: a FIFO would block
        if reason is not None:
            problems.append(f"data.metadata={metadata} {reason.replace('file not found', 'does not exist')}")
    ckpt_problem = _ckpt_path_problem(OmegaConf.select(cfg, "ckpt_path", default=None))
    if ckpt_problem:
        problems.append(ckpt_problem)
    init_from = OmegaConf.select(cfg, "lora.init_from")
    rank = OmegaConf.select(cfg, "lora.rank")
    if init_from is not None and isinstance(rank, int) and not any(p.startswith("lora.") for p in earlier):
        # read and checked against lora.rank / lora.targets before the model loads (values included)
        from fusedit.lora.init_from import read_init_lora

        targets = OmegaConf.select(cfg, "lora.targets")
        try:
            read_init_lora(
                str(init_from),
                rank,
                OmegaConf.to_object(targets) if OmegaConf.is_config(targets) else targets,
                cfg.model.layout,
                family,
            )
        except ValueError as error:
            problems.append(str(error) if str(error).startswith("lora.init_from") else f"lora.init_from: {error}")
    return problems


def _ckpt_path_problem(ckpt_path) -> str | None:
    if ckpt_path and not Path(str(ckpt_path)).expanduser().exists():
        return f"ckpt_path={ckpt_path} does not exist; give a run directory (outputs/train/runs/<time>) or a .ckpt file"
    return None


def check_ckpt_path(ckpt_path) -> None:
    """Refuse a `ckpt_path` that does not exist, in milliseconds: train.py checks it before importing the trainer
    (seconds) and recomposing the run's config."""
    problem = _ckpt_path_problem(ckpt_path)
    if problem:
        raise ConfigError(f"invalid training config: {problem}")


def _check_accelerator(cfg: DictConfig, problems: list[str]) -> None:
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="cpu") or "cpu")
    if accelerator not in ("gpu", "cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        problems.append(
            f"trainer.accelerator={accelerator} (a GPU trainer profile), but this machine has no CUDA GPU that torch "
            "can use; train on a GPU machine, or run on the CPU with trainer=cpu"
        )


TENSORBOARD_HINT = (
    "logger=tensorboard needs tensorboard: pip install 'fusedit[tensorboard]' (or pip install tensorboard)"
)


def _logger_problems(cfg: DictConfig) -> list[str]:
    """A TensorBoard logger without tensorboard installed (Lightning would fail after the model loads)."""
    import importlib.util

    targets = [
        str(logger.get("_target_", "")) for logger in (cfg.get("logger") or {}).values() if OmegaConf.is_dict(logger)
    ]
    wants_tensorboard = any(target.endswith("TensorBoardLogger") for target in targets)
    has_writer = any(importlib.util.find_spec(name) is not None for name in ("tensorboard", "tensorboardX"))
    return [TENSORBOARD_HINT] if wants_tensorboard and not has_writer else []


def validate_train_config(cfg: DictConfig, check_paths: bool = True) -> None:
    """Raise ConfigError listing every problem of `cfg`. `check_paths`: also look at this machine's files and devices
    (model.path, data.metadata, ckpt_path, lora.init_from; a CUDA GPU for a GPU trainer profile)."""
    # The family from model.path's JSON files (no weights): which transformer's LoRA target names apply.
    family = _model_family(cfg) if check_paths or OmegaConf.select(cfg, "model.path") is None else _UNKNOWN
    problems = _lora_problems(cfg, family or _UNKNOWN)
    try:  # the one-field checks of the typed configs (fusedit.step.config), before anything is built
        typed_configs(cfg)
    except (ValueError, TypeError) as error:
        problems.append(str(error))
    problems += _loop_problems(cfg)
    problems += _data_source_problems(cfg)
    problems += _logger_problems(cfg)
    if check_paths:
        problems += _path_problems(cfg, problems, family)
    _check_validation_samples(cfg, check_paths, problems)
    if OmegaConf.select(cfg, "objective.mask_from_edit") and check_paths and _model_family(cfg) == TEXT_TO_IMAGE:
        problems.append(
            "objective.mask_from_edit=true weighs the target's tokens by how much they differ from the edit image; "
            "model.path is Qwen-Image (text-to-image), whose rows have none. Set objective.mask_from_edit=false"
        )
    if OmegaConf.select(cfg, "cache.offload") and check_paths and _model_family(cfg) == QWEN_IMAGE_21:
        problems.append(
            "cache.offload=true streams the MMDiT text encoder's layers while encoding; Qwen-Image-2.1's Qwen3-VL "
            "encoder is not streamed. Set cache.offload=false"
        )
    if check_paths and not problems:
        problems += _lokr_split_problems(cfg, family)
    if check_paths and not problems:
        # Last, and only for a GPU trainer: torch takes seconds to import, and a typo must be reported at once.
        _check_accelerator(cfg, problems)
    if problems:
        head = "invalid training config" if len(problems) > 1 else "invalid training config:"
        raise ConfigError(head + ("\n  " if len(problems) > 1 else " ") + "\n  ".join(problems))


def refuse_subprocess_launch_in_multirun(trainer) -> None:
    """`python train.py -m ...` with a strategy that re-launches the script (DDP/FSDP on one node) cannot work.

    Lightning starts ranks > 0 by running the script's command line again (with `hydra.run.dir` pinned to rank
    0's run dir); in a multirun that command line holds `-m` and the sweep, so every rank would start the whole
    sweep again. Sweeps of multi-GPU jobs go through a launcher that creates the ranks itself
    (`hydra/launcher=fusedit_slurm`: one SLURM job per sweep point, one task per GPU).
    """
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except (ImportError, ValueError):
        multirun = False
    launcher = getattr(trainer.strategy, "launcher", None)
    if multirun and isinstance(launcher, _SubprocessScriptLauncher):
        raise ConfigError(
            f"a multirun (-m) cannot use {type(trainer.strategy).__name__} with {trainer.num_devices} local devices: "
            "Lightning would re-run the whole sweep in every rank. Run the jobs one at a time, or sweep through "
            "hydra/launcher=fusedit_slurm (one SLURM job per sweep point; SLURM starts the ranks)."
        )
