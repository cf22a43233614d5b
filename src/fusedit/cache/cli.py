"""`fusedit cache [overrides]`: fill the cache with the settings a `python train.py [overrides]` run would use."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from fusedit.errors import UserFileNotFoundError, UserInputError

DEFAULT_CONFIG_DIR = Path(__file__).resolve().parents[3] / "conf"


def compose_cache_config(overrides: list[str], config_dir: str | Path = DEFAULT_CONFIG_DIR):
    """The train config for `overrides`, with the defaults train() fills in (tiny model, sample data)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    config_dir = Path(config_dir)
    if not (config_dir / "train.yaml").is_file():
        raise UserFileNotFoundError(f"{config_dir} has no train.yaml; pass --config-dir <repo>/conf")
    if not any(item.startswith("paths.root_dir=") for item in overrides):
        overrides = [f"paths.root_dir={os.getcwd()}", *overrides]
    try:
        with initialize_config_dir(config_dir=str(config_dir.resolve()), version_base="1.3"):
            cfg = compose("train", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as error:
        # A misspelt key or option: Hydra's own message (which names it and the fix) as one line, as train.py
        # prints it, instead of the traceback of the compose call.
        raise UserInputError(_one_line(error)) from None
    from fusedit.data.sample import fill_demo_paths

    fill_demo_paths(cfg)
    return cfg


def _one_line(error: BaseException) -> str:
    """Hydra's message and the OmegaConf reason under it (first line of each), joined."""
    message = str(error).split("Config search path:")[0]  # the search path listing is Hydra's debugging aid
    parts = [" ".join(line.strip() for line in message.splitlines() if line.strip())]
    if error.__cause__ is not None:
        parts.append(str(error.__cause__).splitlines()[0])
    return ": ".join(parts)


def run_cache(args: argparse.Namespace) -> int:
    from fusedit.cache.training import cached_datamodule

    cfg = compose_cache_config(args.overrides, args.config_dir)
    datamodule = cached_datamodule(cfg)
    rows = datamodule.resolve()
    if args.verify:
        for row in rows:
            datamodule.cache.read(row.key, verify=True)
    stats = dict(datamodule.stats, verified=len(rows) if args.verify else 0)
    print(json.dumps(stats, indent=2))
    return 0


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "cache",
        description="Encode every row of data.metadata missing from cache.dir, with the settings `python train.py` "
        "would use for the same overrides (e.g. `fusedit cache model.path=/models/Qwen-Image-Edit "
        "data.metadata=my.csv precision=bf16`). Train from it with `python train.py <same overrides> "
        "cache.enabled=true`.",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/train.yaml (model.*, data.*, cache.*)")
    parser.add_argument(
        "--config-dir", default=str(DEFAULT_CONFIG_DIR), help="the conf/ directory (default: %(default)s)"
    )
    parser.add_argument("--verify", action="store_true", help="also read back every row and check its sha256")
    parser.set_defaults(func=run_cache)
