"""`fusedit bench`: the LoRA training step of every optimisation variant, timed side by side in one run.

    fusedit bench --size tiny                          # CPU, about a minute: eager variants, steps interleaved
    fusedit bench --size full --json bench.json        # GPU: 60 blocks, 8192 image + 256 text tokens
    fusedit bench --size full --layers 12 --variants standard,merged,merged+compile
    fusedit bench --size full --time-budget 8 --json bench.json   # starts no variant that would end past 8 min
    fusedit bench --data-only                          # data-pipeline images/s

A variant is a layout (standard | merged) followed by '+'-joined modifiers from {compile, fp8, float8, ckpt,
ckptN, offload, mask}, e.g. merged+compile+fp8+ckpt2; see fusedit.bench.variants. Reports (--json, --markdown)
are rewritten after every variant, so a run that is stopped keeps what it measured.

Modules: shapes (sizes, random model, inputs), variants (build stages and training step per variant), flops (the FLOPs formula and
device peaks), measure (timing, memory, GEMM counts, SDPA backend), data (data-pipeline throughput), run (the
runner and the report), cli (this command's parser). See docs/performance.md.
"""

from fusedit._lazy import lazy_getattr

# Imported on first use: `import fusedit.bench` (for its docstring, or `fusedit bench`'s parser) loads no torch.
_EXPORTS = {
    "SCHEMA": "fusedit.bench.run",
    "SHAPES": "fusedit.bench.shapes",
    "VARIANTS": "fusedit.bench.variants",
    "BenchShape": "fusedit.bench.shapes",
    "Variant": "fusedit.bench.variants",
    "add_cli": "fusedit.bench.cli",
    "build_parser": "fusedit.bench.cli",
    "main": "fusedit.bench.cli",
    "markdown_table": "fusedit.bench.run",
    "measure_data": "fusedit.bench.data",
    "parse_variant": "fusedit.bench.variants",
    "parse_variants": "fusedit.bench.variants",
    "run_bench": "fusedit.bench.run",
}

__getattr__ = lazy_getattr(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
