"""The train config a `fusedit` subcommand composes from `python train.py` overrides (`fusedit cache`, `fusedit plan`).

One home for what those commands must do alike so that they see the run `train.py` would make: the same conf/, the
same `paths.root_dir` default, Hydra's errors as one line, and the defaults `train()` fills in (tiny model, sample
data) when the overrides leave `model.path` / `data.metadata` null.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from fusedit.errors import UserFileNotFoundError, UserInputError

# The repository's conf/ (fusedit is installed editable from the repository it trains in).
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def compose_train_config(overrides: list[str], config_dir: str | Path = CONF_DIR, fill_demo: bool = True):
    """`conf/train.yaml` composed with `overrides`, as `python train.py overrides` composes it.

    `paths.root_dir` defaults to the working directory, as train.py's `@hydra.main` sets it; `fill_demo=False`
    leaves a null `model.path` / `data.metadata` null (`fusedit plan --size full` reads neither). Raises
    UserFileNotFoundError when `config_dir` has no train.yaml and UserInputError (one line: Hydra's message and
    OmegaConf's reason) for a misspelt key, group or value.
    """
    config_dir = Path(config_dir)
    if not (config_dir / "train.yaml").is_file():
        raise UserFileNotFoundError(f"{config_dir} has no train.yaml; pass --config-dir <repo>/conf")
    if not any(item.startswith("paths.root_dir=") for item in overrides):
        overrides = [f"paths.root_dir={os.getcwd()}", *overrides]
    cfg = _compose("train", overrides, config_dir)
    if fill_demo:
        from fusedit.data.sample import fill_demo_paths

        fill_demo_paths(cfg)
    return cfg


def _compose(config_name: str, overrides: list[str], config_dir: Path):
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException, HydraException
    from omegaconf.errors import OmegaConfBaseException

    _refuse_added_settings(config_name, overrides, config_dir)
    try:
        with initialize_config_dir(config_dir=str(config_dir.resolve()), version_base="1.3"):
            return compose(config_name, overrides=list(overrides))
    except ConfigCompositionException as error:
        unknown = _UNKNOWN_KEY.match(str(error))
        if unknown is not None and "not in struct" in str(error.__cause__):
            # Hydra's hint "To append to your config use +key=value" leads to a key nothing reads; name the
            # setting meant instead.
            key = unknown.group(1)
            others = [item for item in overrides if item.split("=", 1)[0] != key]
            raise UserInputError(
                f"unknown setting '{key}'{_did_you_mean(key, config_name, others, config_dir)}"
            ) from None
        raise UserInputError(_one_line(error)) from None
    except (HydraException, OmegaConfBaseException) as error:
        # A misspelt option or value: Hydra's own message (which names it and the choices) as one line, instead of
        # the traceback of the compose call.
        raise UserInputError(_one_line(error)) from None


_UNKNOWN_KEY = re.compile(r"Could not override '([^']+)'")


def _refuse_added_settings(config_name: str, overrides: list[str], config_dir: Path) -> None:
    """Refuse `+key=value` for a key conf/ does not define: fusedit reads only its own settings, so Hydra would add
    a key that nothing reads and the run would go on without it. `+group=option` (a config group folder) stays
    Hydra's to add; `+hydra.*` is Hydra's own.
    """
    for item in overrides:
        if not item.startswith("+") or item.startswith(("++", "+hydra.", "+hydra/")):
            continue
        key = item[1:].split("=", 1)[0]
        if (config_dir / key.replace(".", "/")).is_dir():
            continue
        others = [other for other in overrides if other != item]
        raise UserInputError(
            f"'{item}' adds a setting fusedit does not read (it reads only those conf/ defines)"
            f"{_did_you_mean(key, config_name, others, config_dir)}"
        )


def _did_you_mean(key: str, config_name: str, overrides: list[str], config_dir: Path) -> str:
    """'; did you mean optim.lr?' from the dotted keys of the config the other overrides compose, or ''."""
    import difflib

    from omegaconf import OmegaConf

    try:
        cfg = _compose(config_name, overrides, config_dir)
    except UserInputError:
        return ""

    def dotted(node, prefix: str = ""):
        for name, value in node.items():
            path = f"{prefix}{name}"
            yield path
            if isinstance(value, dict):
                yield from dotted(value, f"{path}.")

    names = list(dotted(OmegaConf.to_container(cfg, resolve=False)))
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.75)
    if not close:  # the right name one level deeper or higher (`optim.d_coef` for `optim.optimizer.d_coef`)
        by_leaf = {}
        for name in names:
            by_leaf.setdefault(name.rsplit(".", 1)[-1], name)
        close = [by_leaf[leaf] for leaf in difflib.get_close_matches(key.rsplit(".", 1)[-1], by_leaf, n=1, cutoff=0.8)]
    return f"; did you mean {close[0]}?" if close else ""


def exit_on_bad_overrides(config_name: str, args: list[str], config_dir: str | Path = CONF_DIR) -> None:
    """Exit 2 with one `fusedit: error:` line when Hydra would refuse the command line's overrides.

    For `python train.py` / `infer.py` before `@hydra.main` runs: Hydra itself prints a misspelt key as five lines
    and exits 1. Only a plain run is checked here (every argument a `key=value` override, none of Hydra's own
    `hydra.*` keys): a multirun's sweep values, `--cfg` and the other flags are Hydra's to read and report.
    """
    import sys

    if not args or any(arg.startswith(("-", "hydra.", "+hydra.", "~hydra.")) or "=" not in arg for arg in args):
        return
    try:
        _compose(config_name, args, Path(config_dir))
    except UserInputError as error:
        print(f"fusedit: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def _one_line(error: BaseException) -> str:
    """Hydra's message and the OmegaConf reason under it (first line of each), joined."""
    message = str(error).split("Config search path:")[0]  # the search path listing is Hydra's debugging aid
    parts = [" ".join(line.strip() for line in message.splitlines() if line.strip())]
    if error.__cause__ is not None:
        parts.append(str(error.__cause__).splitlines()[0])
    return ": ".join(parts)
