"""`fusedit bench`: its parser and its run (the package docstring is the command's description)."""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass

import torch

from fusedit.bench import __doc__ as BENCH_DOC
from fusedit.bench.data import measure_data
from fusedit.bench.run import SCHEMA, markdown_table, run_bench
from fusedit.bench.shapes import FAMILIES, MMDIT, SHAPES, SHAPES_BY_FAMILY, BenchShape
from fusedit.bench.variants import (
    CATALOGUE,
    FAMILY_DEFAULT_VARIANTS,
    FAMILY_PREFIX,
    MODIFIERS,
    default_variants,
    parse_variants,
)
from fusedit.devices import DTYPES, resolve_device
from fusedit.errors import UserInputError
from fusedit.io import write_json_atomic, write_text_atomic
from fusedit.model.attention import ATTENTION_BACKENDS


def _workers(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--data-workers takes comma-separated integers, got {text!r}") from None
    if any(value < 0 for value in values):
        raise argparse.ArgumentTypeError(f"--data-workers must be >= 0, got {text!r}")
    return values


def _minutes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--time-budget takes minutes as a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"--time-budget must be > 0 minutes, got {text!r}")
    return value


@dataclass(frozen=True)
class SizeDefaults:
    """What --warmup, --steps and --threads default to for one --size."""

    warmup: int
    steps: int
    cpu_threads: int | None  # torch CPU threads on a CPU run; None: torch's choice


# The tiny run is a quick check on a shared CPU (issue 14: under a minute): one warm-up step compiles, four timed
# steps still give quartiles, and one thread: the tiny shape is too small for threads to pay, and on a loaded
# 2-core machine torch's default two threads (OpenMP waiting on a busy core) made each step ~9x slower (10 s vs
# 1.1 s measured). The full run keeps two and five, and torch's threads.
SIZE_DEFAULTS = {"tiny": SizeDefaults(1, 4, 1), "full": SizeDefaults(2, 5, None)}
ORDERS = ("interleaved", "sequential")


def build_parser() -> argparse.ArgumentParser:
    """A parser with only the bench subcommand (for `python -m fusedit.bench` and tests)."""
    parser = argparse.ArgumentParser(prog="fusedit")
    add_cli(parser.add_subparsers(dest="command", required=True))
    return parser


def _add_step_options(parser: argparse.ArgumentParser) -> None:
    """--warmup, --steps, --order, --seed and --threads: how the variants are stepped (defaults per --size)."""
    warmup, steps, threads = (
        ", ".join(f"{size} {getattr(values, field)}" for size, values in SIZE_DEFAULTS.items())
        for field in ("warmup", "steps", "cpu_threads")
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help=f"untimed steps per variant (compile happens here; default {warmup})"
    )
    parser.add_argument("--steps", type=int, default=None, help=f"timed steps per variant (default {steps})")
    parser.add_argument(
        "--order",
        choices=ORDERS,
        default=None,
        help="interleaved: every variant is built first, then their timed steps run round-robin, so a machine's "
        "changing load falls on all alike (needs memory for all the models at once); sequential: one variant after "
        "another. Default: interleaved on a CPU, sequential on a GPU",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help=f"torch CPU threads (default {threads}; None: torch's choice)"
    )


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        description=BENCH_DOC,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--size", choices=sorted(SHAPES), default="tiny", help="model and input shape")
    parser.add_argument("--layers", type=int, default=None, help="number of transformer blocks (partial model)")
    parser.add_argument("--text-tokens", type=int, default=None, help="prompt length (default: the size's)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 1)")
    parser.add_argument(
        "--family",
        choices=[*FAMILIES, "all"],
        default=None,
        help="which transformer: qwen-image (the MMDiT of Qwen-Image-Edit), qwen-image-2.1 (the single-stream "
        "QwenImage21Transformer2DModel) or all (both side by side, each against its own baseline): whose default "
        "variants run, and which family a --variants name without the '2.1:' prefix stands for. Default: the "
        "defaults of all at --size tiny and of qwen-image at full; unprefixed names are qwen-image's",
    )
    defaults = "; ".join(
        f"{size}: {','.join(default_variants(size, FAMILIES if size == 'tiny' else (MMDIT,)))}"
        for size in FAMILY_DEFAULT_VARIANTS[MMDIT]
    )
    parser.add_argument(
        "--variants",
        default=None,
        help="comma-separated variants, each a layout (standard | merged) followed by '+'-joined modifiers from "
        f"{{{', '.join(MODIFIERS)}}}, prefixed with '{FAMILY_PREFIX[FAMILIES[1]]}' for Qwen-Image-2.1 "
        f"(e.g. 2.1:merged+ckpt); 'all' = {','.join(CATALOGUE)}. Default per size: {defaults}; on a CPU "
        "without the compiled ones (their C++ build takes minutes each)",
    )
    parser.add_argument(
        "--time-budget",
        type=_minutes,
        default=None,
        metavar="MINUTES",
        help="start no variant that is expected to end past this many minutes from the start (the slowest finished "
        "variant of its kind is the estimate); the rest are reported as skipped",
    )
    parser.add_argument(
        "--estimate-memory",
        action="store_true",
        help="also predict each variant's peak memory on fake tensors (column 'est. peak GB')",
    )
    parser.add_argument(
        "--estimate-only",
        action="store_true",
        help="only predict peak memory, time nothing: needs no GPU and no memory, also at --size full",
    )
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    _add_step_options(parser)
    parser.add_argument("--attention", choices=ATTENTION_BACKENDS, default="auto", help="SDPA backend preference")
    parser.add_argument("--json", dest="json_path", default=None, help="write the report as JSON (atomically)")
    parser.add_argument("--markdown", dest="markdown_path", default=None, help="write the markdown table too")
    _add_data_options(parser)
    parser.set_defaults(func=main)


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    """The data pipeline's measurement (images/s through fusedit's DataLoader), beside or instead of the steps."""
    parser.add_argument("--data", action="store_true", help="also measure the data pipeline (images/s)")
    parser.add_argument("--data-only", action="store_true", help="measure only the data pipeline")
    parser.add_argument("--data-metadata", default=None, help="dataset CSV/JSONL (default: synthetic JPEGs)")
    parser.add_argument("--data-samples", type=int, default=32, help="synthetic dataset size")
    parser.add_argument("--data-image-size", type=int, default=1328, help="synthetic image side in pixels")
    parser.add_argument("--data-workers", type=_workers, default=(0, 2), help="loader worker counts, e.g. 0,2,4")


def families_from_args(args) -> tuple[str, ...]:
    """The families whose default variants run, and that a variant name without a prefix stands for."""
    family = getattr(args, "family", None)
    if family is None:
        return FAMILIES if args.size == "tiny" else (MMDIT,)
    return FAMILIES if family == "all" else (family,)


def shape_from_args(args, family: str = MMDIT) -> BenchShape:
    """`family`'s shape at --size, with --layers, --text-tokens and --batch applied."""
    shape = SHAPES_BY_FAMILY[family][args.size]
    changes = {}
    if args.layers is not None:
        changes["num_layers"] = args.layers
    if args.text_tokens is not None:
        changes["text_tokens"] = args.text_tokens
    if args.batch is not None:
        changes["batch"] = args.batch
    return shape.replace(**changes) if changes else shape


def _refuse_untimeable(args, device: torch.device, timed: bool) -> None:
    """Stop at once what would run for hours or with a bad thread count, before anything is built."""
    if args.size == "full" and device.type == "cpu" and args.layers is None and timed and not args.data_only:
        # 60 blocks x 3072 wide (or 2.1's 32 x 4096) in fp32 is ~80 GB of weights and minutes per step on a CPU: say so at once.
        raise UserInputError(
            "--size full is the real model's shape (Qwen-Image's 20B, Qwen-Image-2.1's 32 blocks of 4096) and needs a "
            "GPU to time; on CPU use --size tiny, a partial model with "
            "--layers N, or --estimate-only for its predicted peak memory"
        )
    if args.threads is not None and args.threads < 1:
        raise UserInputError(f"--threads must be >= 1, got {args.threads}")


def _bench_dtype(args, device: torch.device, timed: bool) -> torch.dtype:
    # A memory prediction is for the GPU run: bf16 unless told otherwise, also when predicted on a CPU.
    on_gpu_dtype = device.type == "cuda" or not timed
    return DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if on_gpu_dtype else torch.float32)


def _write_reports(args, report: dict) -> str:
    """Write the report where --json / --markdown ask (atomically: a killed run leaves the last whole one)."""
    table = markdown_table(report)
    if args.json_path:
        write_json_atomic(args.json_path, report)
    if args.markdown_path:
        write_text_atomic(args.markdown_path, table)
    return table


def _progress_lines(report: dict, device: torch.device, time_budget: float | None, shown: set[int]) -> list[str]:
    """stderr lines: what will run (before the first variant), then one per variant as it finishes (an interleaved
    run finishes them out of order); `shown` holds the indices already told and is updated."""
    if not shown and all(r["status"] == "pending" for r in report["variants"]):
        names = ", ".join(r["name"] for r in report["variants"])
        budget = "" if time_budget is None else f", time budget {time_budget:g} min"
        order = report["settings"].get("order")
        return [f"fusedit bench: {report['shape']['name']} on {device}, {order}: {names}{budget}"]
    lines = []
    for index, last in enumerate(report["variants"]):
        if last["status"] == "pending" or index in shown:
            continue
        shown.add(index)
        detail = ""
        if last["status"] == "ok":
            detail = f"{last['step_s']:.4g} s/step, "
        elif last.get("est_peak_mem_gb") is not None:
            detail = f"predicted peak {last['est_peak_mem_gb']:.2f} GB, "
        elif last["reason"]:
            detail = f"{last['reason'].splitlines()[0][:200]}, "
        wall = "" if last.get("wall_s") is None else f"wall {last['wall_s']:.0f} s, "
        lines.append(
            f"fusedit bench: [{len(shown)}/{len(report['variants'])}] {last['name']}: {last['status']} "
            f"({detail}{wall}{report['elapsed_s']:.0f} s elapsed)"
        )
    return lines


def _variants(args, device: torch.device, timed: bool) -> list | None:
    # Names first (parse_variants): a typo in --variants should stop the run before anything is built.
    if args.variants is None:  # the defaults carry their prefixes: an MMDiT name stands for the MMDiT alone here
        names, families = default_variants(args.size, families_from_args(args)), (MMDIT,)
    else:  # a name without a prefix is the MMDiT's, as before 2.1, unless --family says otherwise
        names, families = args.variants, (MMDIT,) if args.family is None else families_from_args(args)
    variants = None if args.data_only else parse_variants(names, families)
    if args.variants is None and variants and device.type == "cpu" and timed:
        # Inductor's C++ build takes minutes per compiled variant on a 2-core CPU (281 s and 232 s measured, the
        # six other tiny variants 40 s together), which would turn the quick tiny check into ten minutes; and a
        # CPU's compiled step says nothing of the GPU's. `--variants merged+compile,...` still times them here.
        variants = [variant for variant in variants if not variant.compile]
    return variants


def main(args) -> int:
    device = resolve_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"), "--device")
    timed = not args.estimate_only
    variants = _variants(args, device, timed)
    _refuse_untimeable(args, device, timed)
    defaults = SIZE_DEFAULTS[args.size]
    threads = defaults.cpu_threads if args.threads is None and device.type == "cpu" else args.threads
    if threads is not None:
        torch.set_num_threads(threads)
    command = "fusedit " + " ".join(shlex.quote(arg) for arg in sys.argv[1:]) if sys.argv else None
    shown: set[int] = set()

    def progress(report: dict) -> None:
        _write_reports(args, report)
        for line in _progress_lines(report, device, args.time_budget, shown):
            print(line, file=sys.stderr, flush=True)

    if args.data_only:
        report = {"schema": SCHEMA, "command": command, "variants": []}
    else:
        report = run_bench(
            {family: shape_from_args(args, family) for family in FAMILIES},
            variants,
            device,
            _bench_dtype(args, device, timed),
            warmup=defaults.warmup if args.warmup is None else args.warmup,
            steps=defaults.steps if args.steps is None else args.steps,
            seed=args.seed,
            attention=args.attention,
            command=command,
            time_budget_s=None if args.time_budget is None else args.time_budget * 60,
            on_progress=progress,
            estimate_memory=args.estimate_memory,
            timed=timed,
            interleave=None if args.order is None else args.order == "interleaved",
        )
    if args.data or args.data_only:
        side = args.data_image_size
        report["data"] = measure_data(
            args.data_metadata, args.data_samples, (side, side), workers=args.data_workers, seed=args.seed
        )
    print(_write_reports(args, report), end="")
    failed = [v["name"] for v in report["variants"] if v["status"] == "failed"]
    if failed:
        print(f"fusedit bench: variant(s) failed: {', '.join(failed)} (see the JSON report)", file=sys.stderr)
        return 1
    return 0
