"""Helpers shared by the training tests: compose the real config the way `python train.py` does."""

from __future__ import annotations

import os
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


def script_env(*paths: Path, **variables: str) -> dict:
    """The environment for a `python train.py` subprocess: this checkout's src/ (then `paths`) first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *map(str, paths), env.get("PYTHONPATH", "")])
    env.update(variables)
    return env


def compose_train(overrides: list[str] = (), hydra_config: bool = False) -> DictConfig:
    """The composed `train` config (without running anything)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra_config)


def train_cfg(tmp_path: Path, model_path: Path, metadata: Path, overrides: list[str] = ()) -> DictConfig:
    """A config ready for `train(cfg)`: tiny model, given data, everything written under `tmp_path`."""
    base = [
        f"paths.root_dir={tmp_path}",
        f"paths.output_dir={tmp_path / 'run'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"model.path={model_path}",
        f"data.metadata={metadata}",
        "logger=csv",
        "callbacks.validation_images.num_samples=0",
        "callbacks.model_checkpoint.every_n_train_steps=1000",
        "callbacks.lora_export.every_n_steps=0",
        "lora.rank=4",
        "lora.alpha=4",
    ]
    cfg = compose_train([*base, *overrides], hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def train_with_callbacks(cfg: DictConfig, extra_callbacks=()) -> dict:
    """`train(cfg)` with test callbacks added to the ones it builds from the config."""
    import fusedit.training.train as train_module

    original = train_module.build_callbacks
    train_module.build_callbacks = lambda c: [*original(c), *extra_callbacks]
    try:
        return train_module.train(cfg)
    finally:
        train_module.build_callbacks = original
