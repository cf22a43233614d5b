"""`fusedit convert`."""

from __future__ import annotations

import argparse
import json

from .files import convert_checkpoint
from .layout import DIRECTIONS
from .lora_formats import FORMATS


def add_cli(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "convert",
        description=(
            "Lossless conversion. IN may be a .safetensors file (model or LoRA), a transformer folder (sharded or "
            "not), a pipeline folder (its transformer/ is converted, the rest copied) or a PEFT LoRA folder. "
            "Prints a JSON report."
        ),
    )
    parser.add_argument("--input", required=True, metavar="IN")
    parser.add_argument("--output", required=True, metavar="OUT")
    parser.add_argument("--direction", choices=DIRECTIONS, help="target layout; optional for a LoRA format change")
    parser.add_argument("--format", choices=FORMATS, help="LoRA output format (default: the input's format)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    report = convert_checkpoint(args.input, args.output, args.direction, args.format, overwrite=args.overwrite)
    if report.get("noop"):
        report["note"] = "input already in the target layout (or has no q/k/v weights): written unchanged"
    print(json.dumps(report, indent=2))
    return 0
