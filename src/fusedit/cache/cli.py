"""`fusedit cache [overrides]`: fill the cache with the settings a `python train.py [overrides]` run would use."""

from __future__ import annotations

import argparse
import json

from fusedit.train_config import CONF_DIR, compose_train_config


def run_cache(args: argparse.Namespace) -> int:
    from fusedit.cache.training import cached_datamodule

    cfg = compose_train_config(args.overrides, args.config_dir)
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
    parser.add_argument("--config-dir", default=str(CONF_DIR), help="the conf/ directory (default: %(default)s)")
    parser.add_argument("--verify", action="store_true", help="also read back every row and check its sha256")
    parser.set_defaults(func=run_cache)
