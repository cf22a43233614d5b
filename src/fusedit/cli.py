"""The `fusedit` console script. Each subcommand's parser lives beside the code it drives (`add_cli(subparsers)`
in the module named below); only the module of the command being run is imported, so `fusedit --help` and a
mistyped command answer without loading torch, and `fusedit detect` without loading Lightning or diffusers."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Iterable

from fusedit.errors import Refusal

# command -> (module whose `add_cli(subparsers)` adds it with `set_defaults(func=...)`, summary for `--help`).
COMMANDS = {
    "make-tiny": ("fusedit.tiny", "write a tiny random Qwen-Image pipeline (diffusers layout) for tests and demos"),
    "convert": (
        "fusedit.convert.cli",
        "convert a model or LoRA between the standard and merged-QKV layouts, or between LoRA formats",
    ),
    "detect": ("fusedit.detect", "describe a Qwen-Image pipeline, transformer, model file or LoRA (JSON)"),
    "download": (
        "fusedit.download",
        "fetch a Qwen-Image pipeline (only the components it needs) from the Hugging Face Hub",
    ),
    "bench": ("fusedit.bench.cli", "time the LoRA training step of each optimisation variant side by side"),
    "cache": ("fusedit.cache.cli", "encode a dataset's VAE latents and prompt embeddings into the training cache"),
    "plan": ("fusedit.plan.cli", "predict a training run's peak GPU memory and choose the plan that fits a GPU"),
}


def _command_in(argv: list[str]) -> str | None:
    # The top-level parser has no options but -h, so the first word that is not an option is the command.
    return next((word for word in argv if not word.startswith("-")), None)


def build_parser(full: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The `fusedit` parser. The commands in `full` (default: all) get their real parser, which imports their module;
    the others are stubs carrying their summary (enough for `fusedit --help` and to reject an unknown command)."""
    full = set(COMMANDS if full is None else full)
    parser = argparse.ArgumentParser(
        prog="fusedit",
        description="Tools around LoRA fine-tuning of Qwen-Image-Edit with merged QKV projections (training is "
        "`python train.py`, inference `python infer.py`). `fusedit COMMAND --help` describes a command.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, summary) in COMMANDS.items():
        if name in full:
            importlib.import_module(module).add_cli(_WithSummary(subparsers, summary))
        else:
            subparsers.add_parser(name, help=summary, add_help=False)
    return parser


class _WithSummary:
    """`subparsers` for one command's `add_cli`, giving its parser the summary from COMMANDS (the one home of the
    summaries: the stubs need them without importing the command's module)."""

    def __init__(self, subparsers, summary: str):
        self._subparsers, self._summary = subparsers, summary

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        return self._subparsers.add_parser(name, **{**kwargs, "help": self._summary})


def main(argv: list[str] | None = None) -> int:
    """Run `fusedit ARGV`; returns the exit status. A refusal (fusedit.errors.Refusal) prints one line and returns 2;
    any other exception is a bug and keeps its traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command_in(argv)
    args = build_parser(full=[command] if command in COMMANDS else []).parse_args(argv)
    try:
        result = args.func(args)
        sys.stdout.flush()  # a reader that went away (`fusedit detect ... | head`) shows here, not at exit
    except BrokenPipeError:
        # The reader has what it wanted. Point stdout at /dev/null so the interpreter's own flush at exit does not
        # raise again, and exit as a command stopped by SIGPIPE does (128 + 13), without a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Refusal as error:
        print(f"fusedit {args.command}: error: {error.cli_message()}", file=sys.stderr)  # --overwrite, not overwrite=
        return 2
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
