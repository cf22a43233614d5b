"""The Hydra config: every group option composes, profiles set what they promise, typos are clear errors, and the
CLI works end to end (a two-job sweep writes two LoRAs of the right ranks, one wandb run each)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from safetensors import safe_open

from fusedit.data import make_sample_dataset
from fusedit.training.train import configure_wandb_mode
from tests.training_utils import CONF, REPO, compose_train, script_env

# The groups train.yaml's defaults list names (conf/ also holds inference-only groups).
GROUPS = sorted(next(iter(entry)) for entry in OmegaConf.load(CONF / "train.yaml").defaults if OmegaConf.is_dict(entry))
GROUPS = [group for group in GROUPS if group != "hydra"]


def options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes(group, option):
    if group == "hparams_search":
        # The Optuna sweeper is the optional `sweep` extra (pip install -e ".[sweep]").
        pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    assert_resolves(compose_train([f"{group}={option}"], hydra_config=True))


def assert_resolves(cfg) -> None:
    """Everything outside Hydra's own node resolves (no dangling interpolation, no missing value)."""
    body = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
    body.paths.root_dir = "/tmp/r"
    body.paths.output_dir = "/tmp/r/run"
    OmegaConf.to_container(body, resolve=True, throw_on_missing=True)


# Issue 15's data and objective options compose with every group option (one compose each, all options at once:
# the folder source, caption dropout, a mask column, mask_from_edit); each source's data module and the objective
# are then built from a composed config (their settings checks run; no file is read).
FOLDER = ["data.format=folder", "data.image_dir=/d/t", "data.control_dirs=[/d/c]", "data.mask_dir=/d/m"]
HF = ["data.format=hf", "data.path=/d/ds", "data.columns={edit_image:edit,prompt:text}"]
DROPOUT_AND_MASKS = ["data.caption_dropout=0.1", "data.mask_column=m", "objective.mask_from_edit=true"]


def test_new_data_and_objective_options_compose_with_every_group():
    from hydra.utils import instantiate

    for group in GROUPS:
        for option in options(group) if group != "hparams_search" else []:  # the sweeper is an optional extra
            assert_resolves(compose_train([f"{group}={option}", *FOLDER, *DROPOUT_AND_MASKS], hydra_config=True))
    for source in (FOLDER, HF):
        cfg = compose_train([*source, *DROPOUT_AND_MASKS])
        module = instantiate(cfg.data)
        assert module.source.format == cfg.data.format and module.hparams.caption_dropout == 0.1
        assert module.columns.mask == "m"
    assert instantiate(cfg.objective).mask_from_edit is True


def test_gpu_profile_composes_for_the_real_model():
    cfg = compose_train(["model=merged_qkv", "trainer=a100", "model.path=/models/Qwen-Image-Edit"])
    assert cfg.model.layout == "merged_qkv" and cfg.model.path == "/models/Qwen-Image-Edit"
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.devices == 1
    assert cfg.precision.name == "bf16" and cfg.trainer.precision == "bf16-mixed"
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
    small = compose_train(["trainer=rtx4090"])
    assert small.precision.fp8 == "storage" and small.model.activation_checkpointing == 1
    assert small.trainer.accumulate_grad_batches == 4
    assert compose_train(["trainer=h100"]).model.compile is True
    # The user overrides any part of a profile.
    assert compose_train(["trainer=a100", "precision=fp32"]).trainer.precision == "32-true"
    assert compose_train(["trainer=rtx4090", "model.activation_checkpointing=2"]).model.activation_checkpointing == 2


def test_cpu_default_is_the_tiny_run():
    cfg = compose_train()
    assert cfg.model.path is None and cfg.data.metadata is None  # tiny pipeline + generated sample data
    # trainer=auto: the CPU plan without a GPU (fusedit.plan.config.resolve_training_plan), fp32
    assert cfg.trainer.accelerator == "auto" and cfg.plan.auto and cfg.precision.name == "fp32"
    assert cfg.optim.optimizer._partial_ and cfg.optim.optimizer.lr == cfg.optim.lr


def test_typos_are_clear_hydra_errors():
    with pytest.raises(ConfigCompositionException, match="mergd_qkv") as error:
        compose_train(["model=mergd_qkv"])
    assert "merged_qkv" in str(error.value.__cause__ or error.value) or "Available options" in str(error.value)
    with pytest.raises(ConfigCompositionException, match="rnak"):
        compose_train(["lora.rnak=8"])
    with pytest.raises(ConfigCompositionException):
        compose_train(["trainer=a1000"])


def _env() -> dict:
    return script_env(HYDRA_FULL_ERROR="0")


def _train_py(*overrides: str, cwd, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    """`python train.py *overrides` in a subprocess, from `cwd`."""
    command = [sys.executable, str(REPO / "train.py"), *overrides]
    return subprocess.run(command, capture_output=True, text=True, env=env or _env(), cwd=cwd, timeout=timeout)


def test_cli_typo_shows_the_error_not_a_traceback(tmp_path):
    result = _train_py("lora.rnak=8", f"paths.log_dir={tmp_path}", cwd=tmp_path)
    assert result.returncode != 0
    assert "rnak" in result.stderr and "Traceback" not in result.stderr
    result = _train_py("lora=attention", cwd=tmp_path)
    assert result.returncode != 0
    assert "attn_mlp" in result.stderr  # Hydra lists the available options


def test_wandb_is_offline_without_credentials(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert configure_wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert configure_wandb_mode() == "disabled"  # an explicit mode is respected
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert configure_wandb_mode() == "online"


@pytest.mark.slow
def test_two_job_multirun_writes_two_loras_with_their_ranks(tmp_path, tiny_edit_path):
    metadata = make_sample_dataset(tmp_path / "data", n=2, size=32)
    env = _env()
    env.pop("WANDB_API_KEY", None)
    env["WANDB_MODE"] = "offline"
    env["WANDB_SILENT"] = "true"
    result = _train_py(
        "-m",
        "lora.rank=2,4",
        f"model.path={tiny_edit_path}",
        f"data.metadata={metadata}",
        # No paths.* override: the default paths must resolve in a multirun (cwd=tmp_path -> tmp_path/outputs).
        "trainer.max_steps=2",
        "callbacks.validation_images.num_samples=0",
        "callbacks.progress_bar=null",
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "train" / "multiruns").iterdir()
    ranks, wandb_runs = {}, set()
    for job in sorted(sweep.iterdir()):
        if not job.is_dir() or not job.name.isdigit():
            continue
        with safe_open(str(job / "lora" / "final.safetensors"), "pt") as handle:
            config = json.loads(handle.metadata()["lora_adapter_metadata"])
            shapes = {handle.get_slice(key).get_shape()[0] for key in handle.keys() if ".lora_A." in key}
        ranks[job.name] = (config["transformer.r"], shapes)
        wandb_runs.add((job / "wandb_run_id").read_text())
        assert len(list((job / "wandb").glob("offline-run-*"))) == 1  # each job its own run
    assert ranks == {"0": (2, {2}), "1": (4, {4})}
    assert len(wandb_runs) == 2


def test_an_optuna_sweep_prints_no_plugin_setup_lines(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    # A target typo stops the one trial at config validation: the sweeper's start-up output, without training.
    result = _train_py(
        "-m", "hparams_search=optuna", "hydra.sweeper.n_trials=1", "lora.targets=[attn,to_qkvv]", cwd=tmp_path
    )
    assert result.returncode == 2, result.stderr[-3000:]
    printed = result.stdout + result.stderr
    assert "Study name: fusedit_lora" in printed and "to_qkvv" in printed  # the sweep ran its trial
    assert "setup plugin" not in printed, printed[-3000:]


@pytest.mark.parametrize("layout", options("lora"))
def test_alpha_follows_rank_so_a_rank_sweep_changes_only_the_rank(layout):
    for rank in (16, 32, 64):
        lora = compose_train([f"lora={layout}", f"lora.rank={rank}"]).lora
        assert lora.alpha == rank and not lora.use_rslora  # scale alpha / rank = 1 at every rank
    assert compose_train([f"lora={layout}", "lora.rank=64", "lora.alpha=32"]).lora.alpha == 32


def test_multi_node_ddp_composes():
    cfg = compose_train(["trainer=ddp", "trainer.num_nodes=2"])
    assert cfg.trainer.num_nodes == 2 and cfg.trainer.strategy._target_.endswith("DDPStrategy")
    assert compose_train().trainer.num_nodes == 1


def test_the_trainer_base_is_not_offered_as_a_choice():
    assert "default" not in options("trainer")
    with pytest.raises(ConfigCompositionException) as error:
        compose_train(["trainer=defualt"])
    assert "default" not in str(error.value).split("Available options", 1)[1]


@pytest.mark.parametrize(
    "overrides",
    [
        ["callbacks=ema", "callbacks.ema.decay=0.99", "optim=prodigy", "lora.type=dora", "model=standard"],
        ["optim=adafactor", "lora.init=pissa_niter_4", "precision=bf16", "lora=attn"],
        ["optim=schedulefree", "lora.init=olora", "lora.use_rslora=true", "trainer=ddp"],
        ["callbacks=ema", "lora.type=lokr", "lora.decompose_factor=48", "optim=prodigy", "lora=full"],
        ["lora.type=loha", "model=standard", "precision=bf16", "trainer=ddp", "lora.rank=8"],
    ],
)
def test_optimizers_ema_and_adapter_options_compose_with_the_other_groups(overrides):
    from fusedit.step.config import typed_configs
    from fusedit.training.validate_config import validate_train_config

    cfg = compose_train(overrides)
    validate_train_config(cfg, check_paths=False)  # a valid combination: nothing refused
    _, lora, _ = typed_configs(cfg)
    assert (lora.type, lora.init, lora.decompose_factor) == (cfg.lora.type, cfg.lora.init, cfg.lora.decompose_factor)
