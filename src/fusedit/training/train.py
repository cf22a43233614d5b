"""`train(cfg)`: build everything from the Hydra config, fit, export the LoRA, report where things are.

`python train.py` (the repository's thin Hydra entry point) calls this; tests call it directly with a composed
config. Resuming (`ckpt_path=<run dir>`) continues the run in its own directory, with its own saved config
(`resume_config`), at the saved step, optimizer state, LR schedule and data position.
"""

from __future__ import annotations

import copy
import datetime
import logging
import math
import netrc
import os
import signal
import sys
from pathlib import Path

import torch
from hydra.utils import instantiate
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from fusedit.cache.training import cache_enabled, prepare_cached_training
from fusedit.data.sample import fill_demo_paths
from fusedit.devices import to_dtype
from fusedit.errors import UserInputError
from fusedit.io import write_json_atomic, write_text_atomic
from fusedit.plan.config import resolve_training_plan
from fusedit.step.build import build_transformer
from fusedit.step.conditioners import conditioner_class
from fusedit.step.config import typed_configs
from fusedit.training.callbacks import LoRAExport
from fusedit.training.checkpoint import (
    CHECKPOINT_DIR,
    LAST,
    AtomicCheckpointIO,
    auto_resume_checkpoint,
    checkpoint_step,
    resolve_checkpoint,
)
from fusedit.training.checkpoint_checks import check_checkpoint_file
from fusedit.training.console import quiet_third_party_output, without_wandb_anonymous
from fusedit.training.ema import LoRAEMA
from fusedit.training.module import EditLoRAModule
from fusedit.training.run_dir import RUN_CONFIG, RunDirLock, check_same_run, check_writable, is_first_process
from fusedit.training.signals import GracefulStop
from fusedit.training.validate_config import refuse_subprocess_launch_in_multirun, validate_train_config

log = logging.getLogger(__name__)

WANDB_ID_FILE = "wandb_run_id"
PLAN_FILE = "plan.json"  # the training plan and its predicted memory (fusedit.plan), when checked on a GPU


# ---------------------------------------------------------------------------------------------------- resume
RESUMES_FILE = "resumes.yaml"


def run_overrides(run_dir: Path) -> list[str]:
    """The overrides `run_dir` last ran with: those of its latest resume (`resumes.yaml`), else its own command line.

    A resume continues in the run dir, but Hydra writes the resuming invocation's `.hydra/` files into a new dir of
    its own, so the run dir's `.hydra/overrides.yaml` only ever holds the original command line. What a resume
    changed (`trainer.max_steps=5000` to train longer) is recorded by `resume_config` in `resumes.yaml`, one entry
    per resume, and the next resume starts from the latest entry.
    """
    resumes = run_dir / RESUMES_FILE
    if resumes.is_file():
        entries = _load_run_yaml(resumes)
        last = entries[-1] if OmegaConf.is_list(entries) and len(entries) else None
        if not OmegaConf.is_dict(last) or not OmegaConf.is_list(last.get("overrides")):
            raise UserInputError(f"{resumes}: expected a list of {{time, command_line, overrides}} entries")
        return [str(item) for item in last.overrides]
    original = run_dir / ".hydra" / "overrides.yaml"
    if not original.is_file():
        # Composing the defaults instead would resume on another dataset, model or settings without a word.
        raise UserInputError(
            f"run dir {run_dir} has neither {RESUMES_FILE} nor .hydra/overrides.yaml: the settings it was trained "
            "with are unknown. Restore its .hydra/ folder (or write .hydra/overrides.yaml: the run's command-line "
            "overrides as a YAML list, [] for none)"
        )
    overrides = _load_run_yaml(original)
    if not OmegaConf.is_list(overrides):
        raise UserInputError(f"{original}: expected a list of overrides")
    return [str(item) for item in overrides]


def _load_run_yaml(path: Path):
    # A hand-edited or torn file must be named: YAML's own error says only a line and column.
    try:
        return OmegaConf.load(path)
    except Exception as error:  # noqa: BLE001 - yaml's scanner and parser errors share no useful base class
        message = " ".join(str(error).split())
        raise UserInputError(f"{path}: not a valid YAML file ({message}); fix or remove it to resume") from None


@rank_zero_only  # DDP ranks > 0 run train.py again with the same command line: one record per resume
def _record_resume(run_dir: Path, command_line: list[str], overrides: list[str]) -> None:
    resumes = run_dir / RESUMES_FILE
    entries = OmegaConf.to_container(OmegaConf.load(resumes)) if resumes.is_file() else []
    entries.append(
        {
            "time": datetime.datetime.now().isoformat(timespec="seconds"),
            "command_line": list(command_line),
            "overrides": list(overrides),
        }
    )
    write_text_atomic(resumes, OmegaConf.to_yaml(entries))


def resume_config(cfg: DictConfig, overrides: list[str], config_name: str = "train") -> DictConfig:
    """The config to resume `cfg.ckpt_path` with: the overrides the run last ran with, then this one's on top.

    `python train.py ckpt_path=<run dir>` must not fall back to the defaults (another model, another dataset), nor
    to the settings before an earlier resume changed them: the run's overrides (`run_overrides`) are composed again
    with this command line's replacing any of the same key (e.g. `trainer.max_steps=5000` to train longer). Keys the
    run added with `+key=...` are changed with `+key=value` again (Hydra refuses a plain `key=value` for a key its
    default config lacks). The result is validated (train.py relies on that), then recorded in the run dir
    (`resumes.yaml`) so that the next resume keeps it; `.hydra/overrides.yaml` stays the run's original command
    line. Needs an initialised Hydra (inside `@hydra.main` or `initialize_config_dir`).
    """
    if not cfg.get("ckpt_path"):
        return cfg
    _, run_dir = resolve_checkpoint(cfg.ckpt_path)
    if run_dir is None:
        # A .ckpt file outside a run dir: no run settings to start from, nowhere to record them.
        validate_train_config(cfg)
        return cfg
    saved = run_overrides(run_dir)
    from hydra import compose
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    parsed = parser.parse_overrides(overrides)
    current = {override.key_or_group for override in parsed}
    kept = [
        text
        for text, override in zip(saved, parser.parse_overrides(saved), strict=True)
        if override.key_or_group not in current
    ]
    # This command line's `+key=value` passed Hydra's first composition, so `key` is not in the default config; the
    # run's own overrides may have added it (`+callbacks.x={...}` or `debug=overfit`, then `+callbacks.x.seconds=0`
    # or `+trainer.overfit_batches=2`), and `+` on an existing key is an error. `++` adds or overrides.
    run_cfg = compose(config_name=config_name, overrides=kept)
    again = [
        "+" + text
        if override.is_add() and OmegaConf.select(run_cfg, override.key_or_group, default=None) is not None
        else text
        for text, override in zip(overrides, parsed, strict=True)
    ]
    merged = [*kept, *again]
    log.info("resuming %s with overrides %s", run_dir, merged)
    resumed = compose(config_name=config_name, overrides=merged)
    # Only a config that can run is recorded: a typo refused here must not follow the run into its next resume.
    validate_train_config(resumed)
    _record_resume(run_dir, overrides, merged)
    return resumed


# ---------------------------------------------------------------------------------------------------- loggers
def _has_wandb_login() -> bool:
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def configure_wandb_mode() -> str:
    """Offline unless an API key or login exists; an explicit WANDB_MODE is never overridden. Returns the mode."""
    if not os.environ.get("WANDB_MODE") and not os.environ.get("WANDB_API_KEY") and not _has_wandb_login():
        os.environ["WANDB_MODE"] = "offline"
    return os.environ.get("WANDB_MODE", "online")


def _sweep_group() -> str | None:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            return Path(HydraConfig.get().sweep.dir).name
    except (ImportError, ValueError):
        pass
    return None


def build_loggers(cfg: DictConfig, run_dir: Path) -> list[Logger]:
    loggers: list[Logger] = []
    for name, logger_cfg in (cfg.get("logger") or {}).items():
        if not isinstance(logger_cfg, DictConfig) or "_target_" not in logger_cfg:
            continue
        kwargs = {}
        if logger_cfg._target_.endswith("WandbLogger"):
            configure_wandb_mode()
            group = _sweep_group()
            kwargs["group"] = logger_cfg.get("group") or group
            kwargs["name"] = logger_cfg.get("name") or (f"{group}-{run_dir.name}" if group else run_dir.name)
            id_file = run_dir / WANDB_ID_FILE
            if id_file.is_file():  # a resumed run logs into its own wandb run
                kwargs["id"] = id_file.read_text().strip()
                kwargs["resume"] = "allow"
        log.debug("logger %s: %s", name, logger_cfg._target_)
        logger = instantiate(logger_cfg, **kwargs)
        without_wandb_anonymous(logger)
        loggers.append(logger)
    return loggers


def close_wandb(failed: bool) -> None:
    # Multirun jobs run in one process: without finish() every job would log into the first job's run.
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=1 if failed else 0)


def build_callbacks(cfg: DictConfig) -> list[Callback]:
    callbacks = []
    for callback_cfg in (cfg.get("callbacks") or {}).values():
        if isinstance(callback_cfg, DictConfig) and "_target_" in callback_cfg:
            callbacks.append(instantiate(callback_cfg))
    # The EMA updates first in each hook (Lightning calls callbacks in list order), so validation images drawn after
    # step N see the average that includes step N. (Lightning itself moves checkpoint callbacks to the end.)
    return sorted(callbacks, key=lambda callback: not isinstance(callback, LoRAEMA))


# ---------------------------------------------------------------------------------------------------- train
def build_module(cfg: DictConfig, model_path: Path, conditioner: nn.Module | None = None) -> EditLoRAModule:
    """Transformer (ordered transforms), frozen conditioner (unless given), objective and optimizer -> the module."""
    model, lora_spec, precision = typed_configs(cfg)
    transformer = build_transformer(model_path, model, lora_spec, precision)
    if conditioner is None:
        conditioner = conditioner_class(model_path).from_pretrained(model_path, dtype=to_dtype(precision.base_dtype))
    objective = instantiate(cfg.objective, scheduler_config=conditioner.scheduler_config)
    return EditLoRAModule(
        transformer,
        conditioner,
        objective,
        optimizer=instantiate(cfg.optim.optimizer),
        scheduler=OmegaConf.to_container(cfg.optim.scheduler, resolve=True),
        seed=cfg.seed,
        fixed_noise=cfg.get("fixed_noise", False),
        attention=model.attention,
        caption_dropout=float(cfg.data.get("caption_dropout", 0.0)),
    )


def _run_dir_of(cfg: DictConfig) -> Path:
    """The dir `cfg` trains in (a resumed run's own dir), created."""
    run_dir = Path(cfg.paths.output_dir)
    if cfg.get("ckpt_path"):
        resumed_run = resolve_checkpoint(cfg.ckpt_path)[1]
        run_dir = resumed_run if resumed_run is not None else run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def prepare_run(cfg: DictConfig) -> tuple[DictConfig, Path, Path | None]:
    """(a validated copy of `cfg` with the defaults filled in, the run dir, the checkpoint to resume or None).

    A resumed run (`ckpt_path=<run dir>`) continues in its own dir; a run dir that already holds a checkpoint (a
    requeued job) continues from it unless `auto_resume=false`. A null `model.path` / `data.metadata` become the tiny
    pipeline / the generated sample dataset.
    """
    cfg = copy.deepcopy(cfg)
    quiet_third_party_output()
    validate_train_config(cfg)
    ckpt_file = None
    if cfg.get("ckpt_path"):
        ckpt_file, resumed_run = resolve_checkpoint(cfg.ckpt_path)
        if resumed_run is not None:
            # Continue the run in place: its lora/, checkpoints/ and logs keep growing.
            with open_dict(cfg):
                cfg.paths.output_dir = str(resumed_run)
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return _prepare_in_run_dir(cfg, run_dir, ckpt_file)


def _callback_dirs(cfg: DictConfig) -> dict[str, str]:
    dirs = {"paths.output_dir": str(cfg.paths.output_dir)}
    for name, callback_cfg in (cfg.get("callbacks") or {}).items():
        if isinstance(callback_cfg, DictConfig) and callback_cfg.get("dirpath"):
            dirs[f"callbacks.{name}.dirpath"] = str(callback_cfg.dirpath)
    return dirs


def _prepare_in_run_dir(cfg: DictConfig, run_dir: Path, ckpt_file: Path | None) -> tuple[DictConfig, Path, Path | None]:
    # Every directory a callback writes to, checked now: not at the first export (step 500 by default).
    check_writable(_callback_dirs(cfg))
    if ckpt_file is None and cfg.get("auto_resume", True):
        ckpt_file = auto_resume_checkpoint(run_dir)  # a requeued job in its own run dir continues
        if ckpt_file is not None:
            # The same command again continues; another experiment under the same run name is refused.
            check_same_run(run_dir, cfg)
            log.info("run dir %s holds %s: continuing from it", run_dir, ckpt_file)
    if is_first_process():
        write_text_atomic(run_dir / RUN_CONFIG, OmegaConf.to_yaml(cfg))  # what the checkpoints are trained with
    fill_demo_paths(cfg)
    # Before any weight loads: trainer=auto chooses the plan; a plan predicted not to fit the GPU is refused here.
    plan_record = resolve_training_plan(cfg)
    if plan_record is not None and rank_zero_only.rank == 0:
        write_json_atomic(run_dir / PLAN_FILE, plan_record)
    return cfg, run_dir, ckpt_file


def fit(cfg: DictConfig, module: EditLoRAModule, datamodule, callbacks: list[Callback], run_dir: Path, ckpt_file):
    """Lightning's fit with the config's trainer and loggers; returns the trainer. A SIGTERM that this run's
    callbacks did not turn into a checkpointed stop exits with status 143."""
    stop = next((cb for cb in callbacks if isinstance(cb, GracefulStop)), None)
    failed = True
    try:
        loggers = build_loggers(cfg, run_dir)
        trainer: Trainer = instantiate(
            cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()]
        )
        for logger in trainer.loggers:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
            if isinstance(logger, WandbLogger) and trainer.is_global_zero:
                write_text_atomic(run_dir / WANDB_ID_FILE, logger.version or "")
        refuse_subprocess_launch_in_multirun(trainer)
        try:
            trainer.fit(
                module, datamodule=datamodule, ckpt_path=str(ckpt_file) if ckpt_file else None, weights_only=True
            )
        except SIGTERMException:
            if stop is None or stop.stopped_by is None:
                # Lightning stopped on a SIGTERM this run's callbacks did not see: no step-aligned checkpoint was
                # written. SIGTERMException is a SystemExit without a code (status 0): make the stop visible.
                raise SystemExit(128 + signal.SIGTERM) from None
        failed = False
    finally:
        close_wandb(failed)
    return trainer


def train(cfg: DictConfig) -> dict:
    """Train a LoRA as `cfg` says. Returns {"run_dir", "lora_path", "lora_files" (every file of the final export),
    "checkpoint", "metrics", "stopped_by", "exit_code"}."""
    # One process trains in a run dir at a time (fusedit.training.run_dir): the lock is taken before anything is
    # written there and held until the run ends.
    with RunDirLock(_run_dir_of(cfg)):
        cfg, run_dir, ckpt_file = prepare_run(cfg)
        finished = _finished_result(cfg, run_dir, ckpt_file) if ckpt_file is not None else None
        if finished is not None:
            return finished
        seed_everything(cfg.seed, workers=True)

        conditioner = None
        if cache_enabled(cfg):  # no text encoder; the VAE decoder only for validation images (fusedit.cache)
            datamodule, conditioner = prepare_cached_training(cfg)
        else:
            datamodule = instantiate(cfg.data, model_path=cfg.model.path)
        # Every row is checked (files decoded, edit images and prompt tokens counted against the pipeline's JSON
        # files, tokenizer and processor) before any weight is read: a bad row must cost seconds, not a 20B load.
        # Lightning's own setup call then finds the data ready.
        datamodule.setup("fit")
        module = build_module(cfg, Path(cfg.model.path), conditioner)
        if ckpt_file is not None:
            check_checkpoint_file(ckpt_file, module)
        callbacks = build_callbacks(cfg)
        trainer = fit(cfg, module, datamodule, callbacks, run_dir, ckpt_file)

        stop = next((cb for cb in callbacks if isinstance(cb, GracefulStop)), None)
        metrics = {
            key: float(value) for key, value in trainer.callback_metrics.items() if torch.as_tensor(value).numel() == 1
        }
        checkpoint = run_dir / CHECKPOINT_DIR / LAST
        result = {
            "run_dir": run_dir,
            "lora_path": next((cb.last_path for cb in callbacks if isinstance(cb, LoRAExport)), None),
            "lora_files": next((cb.final_paths for cb in callbacks if isinstance(cb, LoRAExport)), []),
            "checkpoint": checkpoint if checkpoint.is_file() else None,
            "metrics": metrics,
            "stopped_by": stop.stopped_by if stop else None,
            "exit_code": stop.exit_code if stop else None,
        }
        if trainer.is_global_zero:
            _report(result, trainer)
        return result


def _finished_result(cfg: DictConfig, run_dir: Path, ckpt_file: Path) -> dict | None:
    """The result of a run whose checkpoint already reached trainer.max_steps (printed), else None.

    Fitting it again would train nothing, print "trained N steps / LoRA: (none written)" and add an empty log
    version; this says what the run holds and how to train on.
    """
    max_steps = int(cfg.trainer.get("max_steps", -1) or -1)
    try:
        step = checkpoint_step(ckpt_file)
    except Exception:  # not a checkpoint: check_checkpoint_file refuses it with its reason, once the model is built
        return None
    if max_steps < 0 or step < max_steps:
        return None
    lora_dir = Path(str(cfg.callbacks.lora_export.dirpath)) if cfg.get("callbacks") else None
    final = lora_dir / "final.safetensors" if lora_dir is not None else None
    lora_path = final if final is not None and final.is_file() else None
    # final-ema / merged copies beside it, as the end-of-run summary lists them
    others = sorted(set(lora_dir.glob("final*.safetensors")) - {final}) if lora_path is not None else []
    print(
        f"fusedit: run {run_dir} already finished: its checkpoint {ckpt_file} is at step {step} and "
        f"trainer.max_steps={max_steps}; nothing to train (raise trainer.max_steps to train longer)\n"
        f"  LoRA:       {lora_path or '(none written)'}\n"
        + "".join(f"              {path}\n" for path in others)
        + f"  run dir:    {run_dir}",
        flush=True,
    )
    return {
        "run_dir": run_dir,
        "lora_path": lora_path,
        "lora_files": [lora_path, *others] if lora_path is not None else [],
        "checkpoint": ckpt_file,
        "metrics": {},
        "stopped_by": None,
        "exit_code": None,
    }


def _report(result: dict, trainer: Trainer) -> None:
    steps = trainer.global_step
    lines = [f"fusedit: trained {steps} step{'' if steps == 1 else 's'}"]
    if result.get("stopped_by"):
        lines[0] = f"fusedit: stopped by {result['stopped_by']} after step {trainer.global_step} (checkpoint saved)"
    if "train/loss" in result["metrics"]:
        lines[0] += f", last train/loss {result['metrics']['train/loss']:.4g}"
    lines.append(f"  LoRA:       {result['lora_path'] or '(none written)'}")
    # every file of the final export: the EMA LoRA (callbacks=ema) and merged-layout copies beside final.safetensors
    lines += [f"              {path}" for path in result.get("lora_files", []) if path != result["lora_path"]]
    if result["checkpoint"]:
        lines.append(f"  checkpoint: {result['checkpoint']}  (resume: python train.py ckpt_path={result['run_dir']})")
    for logger in trainer.loggers:
        where = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
        lines.append(f"  logs:       {where} ({type(logger).__name__})")
        if isinstance(logger, WandbLogger) and os.environ.get("WANDB_MODE") == "offline":
            lines.append(f"              offline: upload with `wandb sync {Path(logger.save_dir) / 'wandb'}`")
    lines.append(f"  run dir:    {result['run_dir']}")
    print("\n".join(lines), flush=True)


def sweep_metric(result: dict, name: str | None) -> float | None:
    """The value a sweeper optimises (cfg.optimized_metric), NaN-safe."""
    if not name:
        return None
    if name not in result["metrics"]:
        raise KeyError(f"optimized_metric {name!r} was not logged; logged: {sorted(result['metrics'])}")
    value = result["metrics"][name]
    return value if math.isfinite(value) else float("inf")
