"""`fusedit bench`: FLOPs formula, GEMM counts, every variant running end to end on CPU, the report's schema.

Speed comparisons (merged vs standard) are benchmark results recorded in BENCHMARKS.md, never asserted here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import fusedit.bench.cli as bench_cli
import fusedit.bench.run as bench_run
from fusedit.bench import build_parser, main, markdown_table, measure_data, parse_variant, parse_variants, run_bench
from fusedit.bench.flops import peak_tflops, step_flops
from fusedit.bench.measure import count_qkv_matmuls
from fusedit.bench.run import VARIANT_FIELDS, finalize_report
from fusedit.bench.shapes import QWEN21_SHAPES, SHAPES, BenchShape, build_random_transformer, make_inputs
from fusedit.bench.variants import CATALOGUE, DEFAULT_VARIANTS, VARIANTS, build_variant
from fusedit.lora.adapter import add_lora
from fusedit.model.attention import attention_backend
from fusedit.model.merged_qkv import fuse_qkv

# Small enough that a compiled variant builds in seconds on two cores.
MICRO = SHAPES["tiny"].replace(
    num_layers=1, num_attention_heads=2, attention_head_dim=32, axes_dims_rope=(8, 12, 12),
    joint_attention_dim=64, target_size=(64, 64), edit_sizes=((64, 64),), text_tokens=8, lora_rank=4,
)  # fmt: skip
# Qwen-Image-2.1's, with two references of different sizes (three prompt text runs around them).
MICRO21 = QWEN21_SHAPES["tiny"].replace(
    num_layers=2, num_attention_heads=2, attention_head_dim=32, axes_dims_rope=(8, 12, 12),
    joint_attention_dim=64, target_size=(64, 64), edit_sizes=((64, 64), (32, 64)), text_tokens=9, lora_rank=4,
)  # fmt: skip


# -- FLOPs ------------------------------------------------------------------------------------------------------------


def test_flops_formula_matches_a_hand_calculation():
    shape = BenchShape(
        name="hand", num_layers=1, num_attention_heads=1, attention_head_dim=16, joint_attention_dim=32,
        axes_dims_rope=(4, 6, 6), target_size=(16, 16), edit_sizes=((16, 16),), text_tokens=2, batch=1,
        lora_rank=1, lora_targets="attn",
    )  # fmt: skip
    # d = 16; 2 image tokens (1 target + 1 edit), 2 text tokens, S = 4, batch 1, merged layout.
    # Block forward: 12 d^2 = 3072 weights per stream, 2 rows each: 2*3072*2*2 = 24576; modulation: 2*3072*1 = 6144.
    # Outside: img_in 64*16*2 + txt_in 32*16*2 + proj_out 16*64*2 + (256*16 + 16*16 + 16*32)*1 = 9984 -> x2 = 19968.
    base_forward = 24576 + 6144 + 19968
    attention_forward = 4 * 4**2 * 16  # 4 S^2 d = 1024
    lora_forward = 2 * 1 * (16 + 48) * 2 * 2  # to_qkv and add_qkv_proj: 2 r (in + out) rows = 512
    # Backward: token Linears 24576, minus block 0's qkv (2*16*48*4 = 6144: its input comes from frozen img_in/txt_in),
    # minus the last block's text stream after attention (to_add_out + txt MLP: 2*2304*2 = 9216), plus proj_out 4096.
    base_backward = 24576 - 6144 - 9216 + 4096
    # LoRA: 2x forward, minus A's input gradient on block 0's qkv (2*1*16*2 per stream).
    lora_backward = 2 * 512 - 2 * (2 * 1 * 16 * 2)
    flops = step_flops(shape, "merged_qkv")
    assert flops["base_forward"] == base_forward == 50688
    assert flops["attention_forward"] == attention_forward
    assert flops["lora_forward"] == lora_forward
    assert flops["forward"] == 52224
    assert flops["backward"] == base_backward + 2 * attention_forward + lora_backward == 16256
    assert flops["step"] == 68480
    # Standard layout: same base, three rank-1 adapters per stream of 2*(16+16)*2 each.
    assert step_flops(shape, "standard")["lora_forward"] == 2 * 3 * 2 * 1 * 32 * 2


@pytest.mark.parametrize("layout", ["standard", "merged_qkv"])
@pytest.mark.parametrize("targets", ["attn_mlp", "full"])
def test_flops_formula_equals_torch_flop_counter_on_the_real_model(layout, targets):
    # The math SDPA backend issues plain bmm's, which FlopCounterMode counts (it skips the CPU flash kernel).
    shape = MICRO.replace(num_layers=2, batch=2, lora_targets=targets)
    model = build_random_transformer(shape, "cpu", torch.float32)
    if layout == "merged_qkv":
        fuse_qkv(model)
    add_lora(model, rank=shape.lora_rank, targets=targets)
    inputs = make_inputs(shape, "cpu", torch.float32)
    with attention_backend("math"):
        with FlopCounterMode(display=False) as forward:
            out = model(
                hidden_states=torch.cat([inputs.target, inputs.condition], 1),
                timestep=torch.full((shape.batch,), 0.5),
                encoder_hidden_states=inputs.prompt_embeds,
                img_shapes=inputs.img_shapes,
                return_dict=False,
            )[0]
        with FlopCounterMode(display=False) as backward:
            out.square().mean().backward()
    expected = step_flops(shape, layout)
    assert forward.get_total_flops() == expected["forward"]
    assert backward.get_total_flops() == expected["backward"]


@pytest.mark.parametrize("layout", ["standard", "merged_qkv"])
def test_qwen21_flops_formula_equals_torch_flop_counter_on_the_real_model(layout):
    # Both layouts do the same GEMM work (5 projections or 2); the exact SDPA processor's per-segment attention.
    from fusedit.step.conditioning_qwen21 import joint_vision_mask

    shape = MICRO21.replace(batch=2)
    model = build_random_transformer(shape, "cpu", torch.float32)
    if layout == "merged_qkv":
        fuse_qkv(model)
    add_lora(model, rank=shape.lora_rank, targets=shape.lora_targets)
    inputs = make_inputs(shape, "cpu", torch.float32)
    with attention_backend("math"):
        with FlopCounterMode(display=False) as forward:
            out = model(
                hidden_states=torch.cat([inputs.condition, inputs.target], 1),
                timestep=torch.full((shape.batch,), 0.5),
                encoder_hidden_states=inputs.prompt_embeds,
                img_shapes=inputs.img_shapes,
                img_mask=joint_vision_mask(inputs.image_slots, inputs.target.shape[1]),
                return_dict=False,
            )[0]
        with FlopCounterMode(display=False) as backward:
            out[:, -inputs.target.shape[1] :].square().mean().backward()
    expected = step_flops(shape, layout)
    assert forward.get_total_flops() == expected["forward"]
    assert backward.get_total_flops() == expected["backward"]


def test_qwen21_full_shape_is_diffusers_default_config():
    """`--size full --family qwen-image-2.1` is QwenImage21Transformer2DModel's default config (the released model's)."""
    import inspect

    from diffusers import QwenImage21Transformer2DModel

    from fusedit.bench.shapes import transformer_config

    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(QwenImage21Transformer2DModel.__init__).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    config = transformer_config(QWEN21_SHAPES["full"])
    assert {name: defaults[name] for name in config} == {**config, "axes_dims_rope": defaults["axes_dims_rope"]}
    assert tuple(defaults["axes_dims_rope"]) == config["axes_dims_rope"]
    full = QWEN21_SHAPES["full"]
    assert (full.num_layers, full.inner_dim, full.tokens, full.reference_slots) == (32, 4096, 8448, 1024)
    merged, standard = step_flops(full, "merged_qkv"), step_flops(full, "standard")
    # Same base GEMM work in both layouts: 2 * 13 d^2 per token per block forward dominates.
    assert merged["base_forward"] == standard["base_forward"]
    assert merged["base_forward"] == pytest.approx(32 * 2 * 13 * 4096**2 * 8448, rel=0.01)


def test_full_shape_flops_and_peaks():
    full = SHAPES["full"]
    assert (full.inner_dim, full.image_tokens, full.tokens) == (3072, 8192, 8448)
    flops = step_flops(full)
    d, tokens = 3072, 8448
    # Dominant terms: 2 * 12 d^2 * tokens per block forward, 4 S^2 d attention per block.
    assert flops["base_forward"] == pytest.approx(60 * 2 * 12 * d**2 * tokens, rel=0.01)
    assert flops["attention_forward"] == 60 * 4 * tokens**2 * d
    assert flops["step"] / 1e12 == pytest.approx(391.75, abs=0.01)
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("NVIDIA GeForce RTX 4090") == 165.0
    assert peak_tflops(None) is None and peak_tflops("Some Future GPU") is None


# -- GEMM counts ------------------------------------------------------------------------------------------------------


def test_qkv_projections_take_six_gemms_per_block_standard_and_two_merged():
    standard = count_qkv_matmuls(
        build_variant(VARIANTS["standard"], MICRO, torch.device("cpu"), torch.float32), torch.float32
    )
    merged = count_qkv_matmuls(
        build_variant(VARIANTS["merged"], MICRO, torch.device("cpu"), torch.float32), torch.float32
    )
    assert standard["base"] == 6 and merged["base"] == 2
    assert standard["lora"] == 12 and merged["lora"] == 4  # A and B per adapted projection
    assert merged["backward"] < standard["backward"]


def test_qwen21_projections_take_five_gemms_per_block_standard_and_two_merged():
    standard, merged = (
        count_qkv_matmuls(
            build_variant(parse_variant(name), MICRO21, torch.device("cpu"), torch.float32), torch.float32
        )
        for name in ("2.1:standard", "2.1:merged")
    )
    # q, k, v, gate, up: 5 -> 2 (to_qkv, img_mlp.gate_up_proj); LoRA A and B per adapted projection.
    assert (standard["base"], standard["lora"], merged["base"], merged["lora"]) == (5, 10, 2, 4)


def test_qwen21_variant_names_and_families():
    assert parse_variant("2.1:merged+ckpt+compile").name == "2.1:merged+compile+ckpt"
    assert parse_variant("2.1:merged").family == "qwen-image-2.1" and parse_variant("merged").family == "qwen-image"
    both = [v.name for v in parse_variants("standard,2.1:merged+ckpt", ("qwen-image", "qwen-image-2.1"))]
    assert both == ["standard", "2.1:standard", "2.1:merged+ckpt"]
    assert [v.name for v in parse_variants("merged", ("qwen-image-2.1",))] == ["2.1:merged"]
    assert "gate/up" in parse_variant("2.1:merged").description
    with pytest.raises(ValueError, match="must start with a layout, got 'turbo'"):
        parse_variant("2.1:turbo")


def test_variant_names_and_parsing():
    assert [v.name for v in parse_variants("standard, merged")] == ["standard", "merged"]
    assert [v.name for v in parse_variants("all")] == list(CATALOGUE) == list(VARIANTS)
    with pytest.raises(ValueError, match="must start with a layout, got 'turbo'"):
        parse_variants("standard,turbo")


def test_named_variants_keep_their_meaning():
    # The names recorded in BENCHMARKS.md mean what they meant before names became composable.
    def spec(name):
        v = parse_variant(name)
        return (v.layout, v.compile, v.fp8, v.checkpoint_every, v.offload, v.keep_mask)

    assert spec("standard") == ("standard", False, "none", 0, False, False)
    assert spec("merged") == ("merged_qkv", False, "none", 0, False, False)
    assert spec("merged+mask") == ("merged_qkv", False, "none", 0, False, True)
    assert spec("merged+compile") == ("merged_qkv", True, "none", 0, False, False)
    assert spec("merged+compile+fp8") == ("merged_qkv", True, "storage", 0, False, False)
    assert spec("merged+compile+float8") == ("merged_qkv", True, "float8", 0, False, False)
    assert spec("merged+ckpt") == ("merged_qkv", False, "none", 1, False, False)
    assert spec("merged+ckpt2") == ("merged_qkv", False, "none", 2, False, False)
    assert spec("merged+ckpt+offload") == ("merged_qkv", False, "none", 1, True, False)
    assert spec("merged+compile+ckpt") == ("merged_qkv", True, "none", 1, False, False)
    assert spec("standard+ckpt") == ("standard", False, "none", 1, False, False)
    assert spec("standard+compile+fp8+ckpt3+offload+mask") == ("standard", True, "storage", 3, True, True)


def test_variant_names_compose_in_any_order_and_are_reported_canonically():
    assert parse_variant("merged+ckpt+compile").name == "merged+compile+ckpt"
    assert parse_variant("merged + mask + float8 + compile").name == "merged+compile+float8+mask"
    assert parse_variant("merged+ckpt1").name == "merged+ckpt"
    assert parse_variant("merged+offload+ckpt4").name == "merged+ckpt4+offload"
    assert "every 4th block checkpointed" in parse_variant("merged+ckpt4").description
    # One spelling or another, a variant runs once.
    assert [v.name for v in parse_variants("merged+ckpt+compile,merged+compile+ckpt,standard")] == [
        "merged+compile+ckpt",
        "standard",
    ]
    assert len(parse_variants("all,merged+compile+ckpt,standard+compile")) == len(CATALOGUE) + 1


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "merged+turbo",
            r"unknown modifier 'turbo'; a variant is a layout \(standard \| merged\) .*compile, fp8, float8, ckpt, ckptN, offload, mask",
        ),
        ("merged++compile", r"empty modifier \(a '\+' too many\)"),
        ("merged+", "empty modifier"),
        ("fast+compile", "must start with a layout, got 'fast'"),
        ("compile+merged", "must start with a layout, got 'compile'"),
        ("merged+fp8+float8", "'fp8' .* and 'float8' .* choose one"),
        ("merged+ckpt+ckpt2", "'ckpt' and 'ckpt2' both set the checkpoint interval"),
        ("merged+ckpt0", "'ckpt0' checkpoints no block"),
        ("merged+offload", "'offload' .* needs 'ckpt' or 'ckptN'"),
        ("merged+compile+compile", "modifier 'compile' given twice"),
        ("merged+ckptx", "unknown modifier 'ckptx'"),
    ],
)
def test_bad_variant_names_are_refused_naming_the_token(name, message):
    with pytest.raises(ValueError, match=message):
        parse_variant(name)


def test_the_default_tiny_cpu_run_is_quick(monkeypatch):
    """Issue 14: `fusedit bench --size tiny` on a shared CPU ends within a minute: no compiled variant (minutes of
    C++ build each), one warm-up step, four timed steps, one thread."""
    asked = {}

    def record(shape, variants, device, dtype, **kwargs):
        asked.update(kwargs, variants=[v.name for v in variants], threads=torch.get_num_threads())
        return {"variants": []}

    threads = torch.get_num_threads()
    monkeypatch.setattr(bench_cli, "run_bench", record)
    try:
        assert main(build_parser().parse_args(["bench", "--size", "tiny", "--device", "cpu"])) == 0
    finally:
        torch.set_num_threads(threads)
    # Both families side by side by default at tiny (issue 16): the MMDiT's eager defaults, then 2.1's pair.
    assert asked["variants"] == [v for v in DEFAULT_VARIANTS["tiny"] if "compile" not in v] + [
        "2.1:standard",
        "2.1:merged",
    ]
    assert (asked["warmup"], asked["steps"], asked["threads"], asked["interleave"]) == (1, 4, 1, None)


def test_default_variants_per_size():
    tiny = [v.name for v in parse_variants(DEFAULT_VARIANTS["tiny"])]
    assert tiny[:2] == ["standard", "merged"]
    full = parse_variants(DEFAULT_VARIANTS["full"])
    # At the full shape only checkpointed variants fit on 80 GB (docs/performance.md); the baseline comes first.
    assert full[0].name == "standard+ckpt" and all(v.checkpoint_every for v in full)
    assert {"merged+ckpt", "merged+compile+ckpt", "merged+compile+fp8+ckpt", "merged+compile+float8+ckpt"} <= {
        v.name for v in full
    }
    with pytest.raises(ValueError, match="no benchmark variant given"):
        parse_variants(" , ")


# -- end to end -------------------------------------------------------------------------------------------------------


def test_both_families_interleave_in_one_run_each_against_its_own_baseline():
    names = ["standard", "2.1:standard", "2.1:merged"]
    shapes = {"qwen-image": MICRO, "qwen-image-2.1": MICRO21}
    report = run_bench(shapes, parse_variants(names), "cpu", torch.float32, warmup=0, steps=2)
    results = _check_report(report, names)
    assert report["settings"]["order"] == "interleaved"
    assert report["baselines"] == {"qwen-image": "standard", "qwen-image-2.1": "2.1:standard"}
    assert report["baseline"] == "standard" and report["shape"]["family"] == "qwen-image"
    assert report["shapes"]["qwen-image-2.1"]["inner_dim"] == 64
    merged = results["2.1:merged"]
    assert merged["speedup_vs_baseline"] == pytest.approx(results["2.1:standard"]["step_s"] / merged["step_s"])
    # Same random 2.1 model, inputs and seed in both layouts: the same loss; 5 -> 2 projections measured.
    assert merged["loss"] == pytest.approx(results["2.1:standard"]["loss"], rel=1e-5)
    assert merged["loss"] != pytest.approx(results["standard"]["loss"], rel=1e-3)
    assert results["2.1:merged"]["step_tflop"] * 1e12 == step_flops(MICRO21, "merged_qkv")["step"]
    assert results["2.1:standard"]["qkv_matmuls_per_block"]["base"] == 5
    table = markdown_table(report)
    assert "Qwen-Image-2.1 shape" in table and "| vs standard / 2.1:standard |" in table
    with pytest.raises(ValueError, match="no benchmark shape for the variants of family qwen-image-2.1"):
        run_bench(MICRO, parse_variants("2.1:merged"), "cpu", torch.float32, steps=1)


def _check_report(report, names):
    assert report["schema"] == "fusedit.bench/1"
    assert {"date", "command", "machine", "shape", "settings", "flops", "variants"} <= report.keys()
    assert [v["name"] for v in report["variants"]] == names
    for result in report["variants"]:
        assert set(VARIANT_FIELDS) <= result.keys()
        if result["name"] == "merged+compile+float8":
            assert result["status"] == "skipped" and "compute capability" in result["reason"]
            continue
        assert result["status"] == "ok", result.get("traceback") or result["reason"]
        assert result["step_s_min"] <= result["step_s"] <= result["step_s_max"]
        assert len(result["times_s"]) == report["settings"]["timed_steps"]
        assert result["samples_per_s"] == pytest.approx(1 / result["step_s"])
        assert result["tflops"] > 0 and result["mfu"] is None  # no CPU peak: MFU is null, not made up
        assert result["peak_mem_kind"] == "cpu_rss_growth"
        assert result["matmul_calls"] > 0 and result["sdpa_backend"] in ("flash_cpu", "math")
        assert torch.isfinite(torch.tensor(result["loss"]))
    return {v["name"]: v for v in report["variants"]}


def test_eager_variants_run_end_to_end_on_cpu():
    names = ["standard", "standard+ckpt", "merged", "merged+mask", "merged+ckpt", "merged+ckpt2",
             "merged+ckpt+offload", "merged+ckpt2+offload", "merged+compile+float8"]  # fmt: skip
    report = run_bench(MICRO.replace(num_layers=2), parse_variants(names), "cpu", torch.float32, warmup=1, steps=2)
    results = _check_report(report, names)
    assert report["complete"] is True and report["baseline"] == "standard"
    # Same random model, inputs and seed: every variant trains the same thing.
    for name in names[1:-1]:
        assert results[name]["loss"] == pytest.approx(results["standard"]["loss"], rel=1e-4)
    assert results["standard"]["qkv_matmuls_per_block"]["base"] == 6
    assert results["merged"]["qkv_matmuls_per_block"]["base"] == 2
    assert results["merged"]["matmul_calls"] < results["standard"]["matmul_calls"]
    # Recomputation shows up as extra GEMMs, not as model FLOPs.
    assert results["merged+ckpt"]["matmul_calls"] > results["merged"]["matmul_calls"]
    assert results["merged+ckpt"]["step_tflop"] == results["merged"]["step_tflop"]
    assert results["merged"]["speedup_vs_standard"] == pytest.approx(
        results["standard"]["step_s"] / results["merged"]["step_s"]
    )
    assert results["merged"]["speedup_vs_baseline"] == results["merged"]["speedup_vs_standard"]
    assert results["standard+ckpt"]["matmul_calls"] > results["standard"]["matmul_calls"]
    assert all(r["wall_s"] > 0 for r in report["variants"] if r["status"] == "ok")
    assert results["merged+compile+float8"]["wall_s"] is None


def test_compiled_fp8_variant_runs_end_to_end_on_cpu():
    # Regional compile + fp8 storage in one variant keeps this to one compilation (~30 s on two busy cores).
    names = ["merged", "merged+compile+fp8"]
    report = run_bench(MICRO, parse_variants(names), "cpu", torch.float32, warmup=1, steps=2)
    results = _check_report(report, names)
    assert results["merged+compile+fp8"]["loss"] == pytest.approx(results["merged"]["loss"], rel=0.05)
    assert results["merged"]["speedup_vs_standard"] is None  # standard not in this run
    assert report["baseline"] is None and results["merged"]["speedup_vs_baseline"] is None


@pytest.mark.slow
def test_other_compiled_variants_run_end_to_end_on_cpu():
    names = ["merged+compile", "merged+compile+ckpt"]
    report = run_bench(MICRO, parse_variants(names), "cpu", torch.float32, warmup=1, steps=2)
    results = _check_report(report, names)
    assert results["merged+compile+ckpt"]["loss"] == pytest.approx(results["merged+compile"]["loss"], rel=1e-4)


def test_cli_writes_json_and_markdown(tmp_path, capfd):
    json_path, markdown_path = tmp_path / "out" / "bench.json", tmp_path / "bench.md"
    args = build_parser().parse_args(
        ["bench", "--size", "tiny", "--layers", "1", "--text-tokens", "8", "--variants", "standard,merged",
         "--warmup", "0", "--steps", "1", "--json", str(json_path), "--markdown", str(markdown_path)]
    )  # fmt: skip
    assert main(args) == 0
    report = json.loads(json_path.read_text())
    assert report["shape"]["num_layers"] == 1 and report["shape"]["text_tokens"] == 8
    assert [v["status"] for v in report["variants"]] == ["ok", "ok"]
    table = markdown_path.read_text()
    printed = capfd.readouterr()  # file descriptors: libkineto writes to fd 2 from C++
    assert table == printed.out
    assert "profiler_start" not in printed.err and "gpuGetDeviceCount" not in printed.err, printed.err
    assert "| standard |" in table and "| merged |" in table and "6+12" in table and "2+4" in table
    assert not list(tmp_path.glob("**/.*.tmp"))  # atomic writes leave no temporaries


def test_cli_rejects_bad_arguments():
    with pytest.raises(ValueError, match="must start with a layout, got 'nope'"):
        main(build_parser().parse_args(["bench", "--variants", "nope"]))
    for budget in ("0", "-1", "soon"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["bench", "--time-budget", budget])
    with pytest.raises(ValueError, match="time budget must be > 0"):
        run_bench(MICRO, parse_variants("merged"), "cpu", torch.float32, time_budget_s=0)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--data-workers", "two"])
    with pytest.raises(ValueError, match="steps >= 1"):
        run_bench(MICRO, parse_variants("merged"), "cpu", torch.float32, steps=0)


def test_failed_and_skipped_variants_are_reported_not_raised():
    report = {
        "schema": "fusedit.bench/1",
        "shape": MICRO.to_dict(),
        "settings": {"dtype": "float32", "warmup_steps": 1, "timed_steps": 1},
        "flops": {"step": 1e9},
        "variants": [
            {"name": "merged+compile+float8", "status": "skipped", "reason": "needs sm89"},
            {"name": "standard", "status": "failed", "reason": "out of memory"},
        ],
    }
    table = markdown_table(report)
    assert "| merged+compile+float8 | skipped: needs sm89 |" in table
    assert "| standard | failed: out of memory |" in table


def test_speedups_fall_back_to_the_checkpointed_baseline():
    def result(name, status="ok", step_s=None):
        return {"name": name, "status": status, "reason": None if status == "ok" else "out of memory", "step_s": step_s}

    report = {
        "schema": "fusedit.bench/1",
        "complete": True,
        "shape": MICRO.to_dict(),
        "settings": {"dtype": "bfloat16", "warmup_steps": 1, "timed_steps": 1},
        "flops": {"step": 1e9},
        "variants": [
            result("standard", "failed"),
            result("standard+ckpt", step_s=3.0),
            result("merged+ckpt", step_s=2.0),
        ],
    }
    finalize_report(report)
    assert report["baseline"] == "standard+ckpt"
    by_name = {r["name"]: r for r in report["variants"]}
    assert by_name["merged+ckpt"]["speedup_vs_baseline"] == pytest.approx(1.5)
    assert by_name["merged+ckpt"]["speedup_vs_standard"] is None
    assert by_name["standard"]["speedup_vs_baseline"] is None
    report["variants"][1]["status"] = "failed"
    assert finalize_report(report)["baseline"] is None
    report["variants"][0].update(status="ok", step_s=4.0)  # plain standard wins whenever it ran
    assert finalize_report(report)["baseline"] == "standard"
    assert by_name["merged+ckpt"]["speedup_vs_baseline"] == by_name["merged+ckpt"]["speedup_vs_standard"] == 2.0


def _bench_args(tmp_path, *extra):
    return build_parser().parse_args(
        ["bench", "--size", "tiny", "--layers", "1", "--text-tokens", "8", "--warmup", "0", "--steps", "1",
         "--json", str(tmp_path / "bench.json"), "--markdown", str(tmp_path / "bench.md"), *extra]
    )  # fmt: skip


def test_time_budget_skips_what_would_not_fit_and_reports_are_rewritten_after_every_variant(tmp_path, monkeypatch):
    clock, on_disk = [0.0], []
    real_run_variant = bench_run.run_variant

    def one_minute_each(variant, *args, **kwargs):
        on_disk.append([v["status"] for v in json.loads((tmp_path / "bench.json").read_text())["variants"]])
        result = real_run_variant(variant, *args, **kwargs)
        clock[0] += 60.0
        return result

    monkeypatch.setattr(bench_run, "_now", lambda: clock[0])
    monkeypatch.setattr(bench_run, "run_variant", one_minute_each)
    args = _bench_args(
        tmp_path,
        "--variants",
        "standard,merged,merged+ckpt,merged+mask",
        "--time-budget",
        "2.5",
        "--order",
        "sequential",
    )
    assert main(args) == 0
    # The report on disk before each variant: what ran so far, the rest pending.
    assert on_disk == [["pending"] * 4, ["ok", "pending", "pending", "pending"]]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["complete"] is True and report["time_budget_s"] == 150
    # 2 min elapsed + ~1 min for the next (the slowest finished eager variant) > 2.5 min: not started.
    assert [v["status"] for v in report["variants"]] == ["ok", "ok", "skipped", "skipped"]
    assert report["variants"][2]["reason"] == "time budget: 2.0 min elapsed + ~1.0 min expected > 2.5 min"
    assert [v["wall_s"] for v in report["variants"]] == [60.0, 60.0, None, None]
    table = (tmp_path / "bench.md").read_text()
    assert "| merged+ckpt | skipped: time budget" in table and "partial report" not in table


def test_a_stopped_run_leaves_the_variants_it_finished(tmp_path, monkeypatch):
    real_run_variant = bench_run.run_variant
    calls = []

    def stopped_during_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a time limit's kill would, mid-variant
        return real_run_variant(*args, **kwargs)

    monkeypatch.setattr(bench_run, "run_variant", stopped_during_the_second)
    with pytest.raises(KeyboardInterrupt):
        main(_bench_args(tmp_path, "--variants", "standard,merged,merged+ckpt", "--order", "sequential"))
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["complete"] is False
    assert [v["status"] for v in report["variants"]] == ["ok", "pending", "pending"]
    assert report["variants"][0]["step_s"] > 0 and report["baseline"] == "standard"
    table = (tmp_path / "bench.md").read_text()
    assert "**partial report**: 1 of 3 variants done" in table and "| merged | pending: not run yet" in table


def test_a_cpu_run_times_the_variants_steps_round_robin(monkeypatch):
    real_make_step, calls = bench_run.make_step, []

    def logged(model, inputs, variant, *args, **kwargs):
        step = real_make_step(model, inputs, variant, *args, **kwargs)

        def logged_step():
            calls.append(variant.name)
            return step()

        return logged_step

    monkeypatch.setattr(bench_run, "make_step", logged)
    report = run_bench(MICRO, parse_variants("standard,merged"), "cpu", torch.float32, warmup=1, steps=3)
    assert report["settings"]["order"] == "interleaved"
    # Each one's warm-up step after its build, three timed rounds of one step each, then one profiled step each:
    # a change of load during the timed steps hits both variants.
    assert calls == ["standard", "merged"] * 5
    assert [len(v["times_s"]) for v in report["variants"]] == [3, 3]
    assert all(v["status"] == "ok" and v["peak_mem_gb"] is not None for v in report["variants"])


def test_out_of_memory_is_reported_and_its_memory_released_before_the_next_variant(monkeypatch):
    real_build, real_release = bench_run.build_variant, bench_run.release_memory
    built, freed_at_release = [], []

    def build_then_run_out_of_memory(variant, *args, **kwargs):
        model = real_build(variant, *args, **kwargs)
        built.append(weakref.ref(model))
        if variant.name == "merged":

            def out_of_memory(*_):  # raised mid-forward: the step's frames hold the model and its activations
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB")

            model.transformer_blocks[-1].register_forward_hook(out_of_memory)
        return model

    def release(device):
        real_release(device)
        freed_at_release.append(built[-1]() is None)

    monkeypatch.setattr(bench_run, "build_variant", build_then_run_out_of_memory)
    monkeypatch.setattr(bench_run, "release_memory", release)
    report = run_bench(
        MICRO, parse_variants("merged,standard"), "cpu", torch.float32, warmup=1, steps=1, interleave=False
    )  # a GPU's order: one variant at a time, its memory handed back before the next
    failed, ran = report["variants"]
    assert (
        failed["status"] == "failed"
        and failed["reason"] == "out of memory: CUDA out of memory. Tried to allocate 1.50 GiB"
    )
    assert ran["status"] == "ok" and ran["step_s"] > 0
    # When the CUDA cache is emptied, nothing of the failed (or the finished) variant is reachable any more.
    assert freed_at_release == [True, True]


GPU_CHECK = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


def _gpu_check(out, *args, **env):
    return subprocess.run(
        ["bash", str(GPU_CHECK), str(out), *args],
        env={**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", **env},
        capture_output=True,
        text=True,
        timeout=int(env.get("GPU_CHECK_SECONDS", 540)) + 60,  # the script ends inside its own budget
    )


def test_gpu_check_script_refuses_without_cuda(tmp_path):
    done = _gpu_check(tmp_path / "out")
    assert done.returncode == 2
    assert "gpu_check.sh: no CUDA device visible to torch" in done.stderr
    assert "no CUDA device visible to torch" in (tmp_path / "out" / "gpu-check.log").read_text()
    assert not (tmp_path / "out" / "bench-full.json").exists()
    usage = subprocess.run(["bash", str(GPU_CHECK)], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage: scripts/gpu_check.sh OUTDIR" in usage.stderr


@pytest.mark.slow
def test_gpu_check_script_runs_the_fit_check_and_the_bench_and_leaves_its_logs(tmp_path):
    # GPU_CHECK_ALLOW_CPU exercises the script's own plumbing on a CPU (the GPU tests are left to the GPU); the fit
    # check runs the 12gb profile at the tiny shape (fp8 storage, streamed blocks, 8-bit AdamW: bf16 on a CPU, slow,
    # hence the longer budget).
    out = tmp_path / "out"
    done = _gpu_check(
        out, "--size", "tiny", "--layers", "1", "--text-tokens", "8", "--variants", "standard,merged",
        "--warmup", "0", "--steps", "1", "--threads", "1", GPU_TESTS="0", GPU_CHECK_ALLOW_CPU="1",
        GPU_FIT_ARGS="--size tiny --profiles 12gb --warmup 0 --steps 1", GPU_FIT_SECONDS="600",
        GPU_BENCH21_ARGS="--size tiny --layers 1 --text-tokens 8 --warmup 0 --steps 1 --threads 1",
        GPU_BENCH21_SECONDS="300", GPU_CHECK_SECONDS="1300",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    # At most eight files (what a device run brings back): the 2.1 bench's log and table go into gpu-check.log.
    assert sorted(p.name for p in out.iterdir()) == [
        "bench-full.json", "bench-full.log", "bench-full.md", "bench21-full.json", "gpu-check.log", "gpu-fit.json",
        "gpu-fit.log", "gpu-fit.md",
    ]  # fmt: skip
    bench21 = json.loads((out / "bench21-full.json").read_text())
    assert [(v["name"], v["status"]) for v in bench21["variants"]] == [
        ("2.1:standard+ckpt", "ok"),
        ("2.1:merged+ckpt", "ok"),
    ]
    report = json.loads((out / "bench-full.json").read_text())
    assert report["complete"] and [v["status"] for v in report["variants"]] == ["ok", "ok"]
    assert report["time_budget_s"] > 1.5 * 60  # what the fit check left of the 1000 s, less a minute's margin
    fit = json.loads((out / "gpu-fit.json").read_text())
    (streamed,) = fit["profiles"]
    assert streamed["status"] == "ok", fit
    assert streamed["plan"]["fp8"] and streamed["plan"]["resident_blocks"] == 1 and streamed["plan"]["cache"]
    # The block streamer copied exactly the bytes the planner predicts: each streamed block twice per step.
    assert streamed["measured"]["host_to_gpu_gb_per_step"] == pytest.approx(streamed["predicted_moved_gb_per_step"])
    assert streamed["predicted_moved_gb_per_step"] > 0 and streamed["floors"]["pcie_gbps"] == 25.0
    assert streamed["measured"]["step_s"] > 0 and streamed["predicted"]["encode_phase"]["mode"] == "offload"
    summary = (out / "gpu-check.log").read_text()
    assert "fit check: done" in summary and "bench: done" in summary and "| 12gb |" in summary
    assert "2.1 bench: done" in summary and "| 2.1:merged+ckpt |" in summary


def test_data_pipeline_throughput_on_synthetic_jpegs():
    data = measure_data(samples=3, image_size=(96, 80), max_pixels=64 * 64, edit_max_pixels=64 * 64, workers=(0,))
    assert data["samples"] == 3 and data["images_per_sample"] == 2
    (row,) = data["loader"]
    assert row["num_workers"] == 0 and row["images"] == 6 and row["images_per_s"] > 0
    assert set(data["stages_ms_per_image"]) == {"decode", "resize", "to_tensor"}
    assert "images/s" in markdown_table({"variants": [], "data": data})
