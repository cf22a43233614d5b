"""`fusedit download REPO --to DIR`: fetch a Qwen-Image pipeline from the Hugging Face Hub, and only what it needs.

The repository's `model_index.json` names the pipeline's components (transformer, vae, text_encoder, tokenizer,
processor, scheduler); only those folders' configs, tokenizer files and safetensors weights are fetched
(`allow_patterns`), never pickled `.bin`/`.pt` weights, sample images or other extras. `--components` narrows it
further (e.g. `transformer` alone to swap weights into an existing pipeline folder).

Without network (or with HF_HUB_OFFLINE=1) the first request fails and the command stops at once with a message
saying so, instead of retrying or leaving a half-written folder behind unannounced.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

# Per component folder: configs, tokenizer vocabularies/merges/templates, safetensors weights (+ their index).
COMPONENT_FILE_PATTERNS = ("*.json", "*.txt", "*.jinja", "*.model", "*.safetensors")


class DownloadError(RuntimeError):
    pass


def _offline_message(repo_id: str, error: BaseException | None) -> str:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        reason = "HF_HUB_OFFLINE is set"
    else:
        detail = f" ({type(error).__name__}: {str(error).splitlines()[0][:200]})" if error else ""
        reason = f"{constants.ENDPOINT} cannot be reached{detail}"
    return (
        f"cannot download {repo_id}: {reason}. "
        "Run this on a machine with network access (and unset HF_HUB_OFFLINE), then copy the folder over, "
        "or point model.path at a local copy."
    )


def check_reachable(repo_id: str, timeout: float = 5.0) -> None:
    """Fail at once when offline: huggingface_hub retries unreachable endpoints with backoff for ~25 s."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise DownloadError(_offline_message(repo_id, None))
    try:
        with urllib.request.urlopen(constants.ENDPOINT, timeout=timeout):
            pass
    except urllib.error.HTTPError:
        pass  # the server answered: reachable, whatever it thinks of a bare GET
    except (urllib.error.URLError, OSError) as error:
        raise DownloadError(_offline_message(repo_id, error)) from None


def component_names(model_index: dict) -> list[str]:
    """Component folders of a diffusers `model_index.json` (entries like `"vae": ["diffusers", "Autoencoder..."]`)."""
    return sorted(
        name
        for name, value in model_index.items()
        if not name.startswith("_") and isinstance(value, list) and len(value) == 2 and value[0] is not None
    )


def allow_patterns(components: list[str]) -> list[str]:
    return ["model_index.json"] + [f"{name}/{pattern}" for name in components for pattern in COMPONENT_FILE_PATTERNS]


def download(
    repo_id: str, to: str | os.PathLike, components: list[str] | None = None, revision: str | None = None
) -> Path:
    """Download the pipeline components of `repo_id` into `to`. Returns `to`."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    to = Path(to).expanduser()
    check_reachable(repo_id)
    try:
        # One small file first: it tells which components exist, and it is where a missing network shows at once.
        index_path = hf_hub_download(repo_id, "model_index.json", revision=revision, local_dir=to, etag_timeout=10)
    except (OfflineModeIsEnabled, LocalEntryNotFoundError) as error:
        raise DownloadError(_offline_message(repo_id, error)) from None
    except GatedRepoError:
        raise DownloadError(f"{repo_id} is gated: accept its licence on the Hub and log in (`hf auth login`)") from None
    except RepositoryNotFoundError:
        raise DownloadError(f"{repo_id}: no such repository on the Hub (or it is private)") from None
    except EntryNotFoundError:
        raise DownloadError(f"{repo_id} has no model_index.json: it is not a diffusers pipeline repository") from None
    except (HfHubHTTPError, OSError) as error:
        raise DownloadError(_offline_message(repo_id, error)) from None

    available = component_names(json.loads(Path(index_path).read_text(encoding="utf-8")))
    wanted = components or available
    unknown = sorted(set(wanted) - set(available))
    if unknown:
        raise DownloadError(f"{repo_id} has no component(s) {unknown}; it has {available}")
    patterns = allow_patterns(wanted)
    try:
        snapshot_download(repo_id, revision=revision, local_dir=to, allow_patterns=patterns, etag_timeout=10)
    except (OfflineModeIsEnabled, LocalEntryNotFoundError, HfHubHTTPError, OSError) as error:
        raise DownloadError(_offline_message(repo_id, error)) from None
    return to


def add_cli(subparsers) -> None:
    """Register `fusedit download REPO --to DIR [--components a b] [--revision REV]`."""
    parser = subparsers.add_parser(
        "download",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("repo_id", help="e.g. Qwen/Qwen-Image-Edit, Qwen/Qwen-Image-Edit-2509, Qwen/Qwen-Image")
    parser.add_argument("--to", required=True, type=Path, help="local folder (becomes model.path for infer.py)")
    parser.add_argument("--components", nargs="+", help="only these component folders (default: all of them)")
    parser.add_argument("--revision", help="branch, tag or commit")
    parser.set_defaults(func=_cli_download)


def _cli_download(args: argparse.Namespace) -> int:
    try:
        path = download(args.repo_id, args.to, args.components, args.revision)
    except DownloadError as error:
        print(f"fusedit download: error: {error}", file=sys.stderr)
        return 1
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fusedit")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["download", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
