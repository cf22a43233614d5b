"""Which files hold a transformer's weights: the one rule that loading, conversion and `fusedit detect` share.

A transformer folder holds either one `*.safetensors` file, or shards listed by one `*.safetensors.index.json`
(diffusers' and transformers' sharded layout: `{"weight_map": {tensor name: shard file name}}`). The shard names
come from a file someone else wrote, so each must name a file inside the folder: `../` or absolute paths are
refused, and so are pickled `.bin` weights (never unpickled). Pure stdlib: no torch import.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fusedit.errors import UserFileNotFoundError, UserInputError

INDEX_SUFFIX = ".safetensors.index.json"


@dataclass(frozen=True)
class WeightFiles:
    """The safetensors files of one transformer (sorted, each once) and the shard index listing them, if any."""

    files: tuple[Path, ...]
    index: Path | None = None


def read_json(path: Path) -> dict:
    """A JSON object from `path`; raises UserInputError naming the file if it is not valid JSON or not an object."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserInputError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise UserInputError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _shard_path(directory: Path, index: Path, name: object) -> Path:
    if not isinstance(name, str) or not name:
        raise UserInputError(f"{index}: weight_map values must be shard file names, got {name!r}")
    path = directory / name
    # The shard must be inside the folder: an index must not make fusedit read (or a conversion copy) other files.
    if Path(name).is_absolute() or not path.resolve().is_relative_to(directory.resolve()):
        raise UserInputError(f"{index}: shard {name!r} is outside {directory}; shard names must be files in the folder")
    if not name.endswith(".safetensors"):
        raise UserInputError(f"{index}: shard {name!r} is not a .safetensors file (pickled weights are refused)")
    return path


def transformer_weight_files(path: str | Path) -> WeightFiles:
    """The weight files of the transformer at `path`: a single `.safetensors` file, or a transformer folder.

    Raises UserFileNotFoundError if `path`, every safetensors file or a listed shard is missing; UserInputError
    for more than one index, an index without a weight_map, a shard name outside the folder, or several
    safetensors files without an index. Each message is one line naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise UserFileNotFoundError(f"{path} does not exist")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise UserInputError(f"{path}: not a .safetensors file (pickled weights are refused)")
        return WeightFiles((path,))
    indexes = sorted(path.glob("*" + INDEX_SUFFIX))
    if len(indexes) > 1:
        raise UserInputError(f"{path}: more than one shard index: {', '.join(p.name for p in indexes)}")
    if indexes:
        index = indexes[0]
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserInputError(f"{index}: no weight_map (expected {{tensor name: shard file}})")
        shards = sorted({_shard_path(path, index, name) for name in weight_map.values()})
        missing = [shard.name for shard in shards if not shard.is_file()]
        if missing:
            raise UserFileNotFoundError(f"{index}: shard(s) listed in weight_map are missing: {', '.join(missing)}")
        return WeightFiles(tuple(shards), index)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UserFileNotFoundError(f"{path}: no safetensors weights found (pickled .bin files are refused)")
    if len(files) > 1:
        raise UserInputError(
            f"{path}: expected one .safetensors file or a *{INDEX_SUFFIX}, found {len(files)} files without an index"
        )
    return WeightFiles((files[0],))
