"""The `fusedit` console script. Each subcommand lives beside the code it drives and registers itself here."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from fusedit.errors import OutputExistsError

# Modules that define `add_cli(subparsers)`; each adds one or more subcommands with `set_defaults(func=...)`.
COMMAND_MODULES = (
    "fusedit.tiny",
    "fusedit.convert",
    "fusedit.detect",
    "fusedit.download",
    "fusedit.bench",
    "fusedit.cache",
    "fusedit.plan",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusedit", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
        sys.stdout.flush()  # a reader that went away (`fusedit detect ... | head`) shows here, not at exit
    except BrokenPipeError:
        # The reader has what it wanted. Point stdout at /dev/null so the interpreter's own flush at exit does not
        # raise again, and exit as a command stopped by SIGPIPE does (128 + 13), without a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OutputExistsError as error:
        print(f"fusedit {args.command}: error: {error.cli_message()}", file=sys.stderr)  # --overwrite, not overwrite=
        return 2
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, TypeError) as error:
        # Bad input is the user's to fix: one clear line, no stack trace wall.
        print(f"fusedit {args.command}: error: {error}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
