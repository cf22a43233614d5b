"""A benchmark ratio is reported with its uncertainty: the timing spread, the speedup's range, and a warning when
the spread makes the ratio meaningless (the 38.98x-with-an-8x-spread headline of a loaded shared CPU)."""

from __future__ import annotations

from fusedit.bench.measure import summarize
from fusedit.bench.run import finalize_report, markdown_table
from fusedit.bench.shapes import SHAPES


def report(standard_times, merged_times) -> dict:
    def variant(name, times):
        return {"name": name, "status": "ok", "reason": None, **summarize(times), "samples_per_s": 1.0,
                "tokens_per_s": 1.0, "tflops": 1.0, "mfu": None, "peak_mem_gb": None, "peak_mem_kind": None,
                "matmul_calls": None, "qkv_matmuls_per_block": None, "sdpa_backend": None}  # fmt: skip

    return finalize_report({
        "schema": "fusedit.bench/1", "complete": True, "shape": SHAPES["tiny"].to_dict(), "flops": {"step": 1e9},
        "settings": {"dtype": "float32", "warmup_steps": 1, "timed_steps": len(standard_times)},
        "variants": [variant("standard", standard_times), variant("merged", merged_times)],
    })  # fmt: skip


def test_a_clear_speedup_is_reported_with_its_range_and_no_warning():
    r = report([1.00, 1.01, 1.02, 1.00, 1.01], [0.50, 0.51, 0.50, 0.52, 0.50])
    merged = r["variants"][1]
    assert merged["speedup_unclear"] is False and 1.9 < merged["speedup_range"][0] <= merged["speedup_range"][1] < 2.1
    assert merged["spread"] == 0.52 / 0.50
    table = markdown_table(r)
    assert "| 2.02x (1.96–2.02) |" in table and "⚠" not in table


def test_a_spread_that_swamps_the_ratio_is_flagged():
    # A loaded machine: one variant's steps vary 8x; the median ratio looks large and means nothing.
    r = report([1.0, 8.0, 4.0, 1.2, 6.0], [0.1, 0.8, 0.11, 0.5, 0.12])
    merged = r["variants"][1]
    assert merged["speedup_unclear"] is True and merged["spread"] == 8.0
    table = markdown_table(r)
    assert "⚠ speedups of merged are within the timing noise" in table and "up to 8.0x" in table
    # Overlapping interquartile ranges with small spreads are unclear too.
    overlapping = report([1.0, 1.1, 1.2, 1.05, 1.15], [0.95, 1.05, 1.1, 1.0, 1.08])["variants"][1]
    assert overlapping["speedup_unclear"] is True
