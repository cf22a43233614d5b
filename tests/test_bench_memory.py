"""fusedit.bench.memory: the fake-tensor peak-memory estimate of a LoRA training step."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from fusedit.bench import build_parser, main, markdown_table
from fusedit.bench.memory import LiveStorageBytes, _storage_bytes, estimate_step_memory
from fusedit.bench.shapes import QWEN21_SHAPES, SHAPES, make_inputs
from fusedit.bench.variants import build_variant, make_step, parse_variants
from fusedit.lora.adapter import lora_parameters
from fusedit.step.objective import FlowMatchObjective

# Enough tokens that activations outweigh the weights, so checkpointing shows in the estimate.
SHAPE = SHAPES["tiny"].replace(num_layers=3, target_size=(256, 256), edit_sizes=((256, 256),), text_tokens=32)


def test_live_bytes_follow_allocations_frees_and_views():
    existing = torch.empty(1000)
    with LiveStorageBytes([existing]) as tracker:
        existing.view(10, 100)  # a view of a storage that was there before: not counted
        first = torch.empty(1000)  # 4000 bytes
        second = torch.empty(2000)  # 8000 bytes
        second.view(2, 1000)  # a view: same storage, not counted again
        assert tracker.live == tracker.peak == 12000
        del first
        third = torch.empty(500)
        assert tracker.live == 10000 and tracker.peak == 12000
    del second, third


def _real_peak(name: str) -> tuple[float, float]:
    """Resident and peak bytes of the same two steps run eagerly on real tensors, tracked the same way."""
    variant = dataclasses.replace(parse_variants(name)[0], compile=False)
    torch.manual_seed(0)
    model = build_variant(variant, SHAPE, torch.device("cpu"), torch.float32)
    optimizer = torch.optim.AdamW(list(lora_parameters(model).values()), lr=1e-5)
    inputs = dataclasses.replace(make_inputs(SHAPE, "cpu", torch.float32), prompt_mask=None)  # as the estimate trims
    step = make_step(model, inputs, variant, optimizer, FlowMatchObjective(weighting="none"), torch.float32)
    rope = [value for module in model.modules() for value in vars(module).values() if isinstance(value, torch.Tensor)]
    resident = [
        *model.parameters(),
        *model.buffers(),
        *rope,
        inputs.target,
        inputs.condition,
        inputs.prompt_embeds,
    ]
    with LiveStorageBytes(resident) as tracker:
        step()
        step()
    resident_bytes = _storage_bytes(resident)
    return resident_bytes / 1e9, (resident_bytes + tracker.peak) / 1e9


@pytest.mark.parametrize("name", ["standard", "merged+ckpt", "merged+compile+fp8"])
def test_fake_estimate_equals_the_real_step_tracked_the_same_way(name):
    # float32: the same bytes logic as bf16, and a CPU steps it several times faster.
    estimate = estimate_step_memory(parse_variants(name)[0], SHAPE, torch.float32)
    # compile is estimated eagerly: compare with the eager run of the same build.
    resident, peak = _real_peak(name)
    assert estimate["resident_gb"] == pytest.approx(resident, rel=1e-9)
    assert estimate["peak_gb"] == pytest.approx(peak, rel=1e-9)
    assert estimate["step_gb"] > 0


def test_qwen21_fake_estimate_equals_the_real_step_tracked_the_same_way():
    # 2.1's token layout comes from the values of its image-slot mask: computed for real (RealMetadata), counted.
    shape = QWEN21_SHAPES["tiny"].replace(num_layers=2, target_size=(64, 64), edit_sizes=((64, 96),), text_tokens=8)
    variant = parse_variants("2.1:merged+ckpt")[0]
    estimate = estimate_step_memory(variant, shape, torch.float32)
    model = build_variant(variant, shape, torch.device("cpu"), torch.float32)
    optimizer = torch.optim.AdamW(list(lora_parameters(model).values()), lr=1e-5)
    inputs = dataclasses.replace(make_inputs(shape, "cpu", torch.float32), prompt_mask=None)
    step = make_step(model, inputs, variant, optimizer, FlowMatchObjective(weighting="none"), torch.float32)
    resident = [*model.parameters(), *model.buffers(), inputs.target, inputs.condition, inputs.prompt_embeds]
    resident.append(inputs.image_slots)
    with LiveStorageBytes(resident) as tracker:
        step()
        step()
    resident_bytes = _storage_bytes(resident)
    assert estimate["resident_gb"] == pytest.approx(resident_bytes / 1e9, rel=1e-9)
    assert estimate["peak_gb"] == pytest.approx((resident_bytes + tracker.peak) / 1e9, rel=1e-9)


def test_checkpointing_and_fp8_storage_lower_the_estimate():
    def estimate(name):
        return estimate_step_memory(parse_variants(name)[0], SHAPE, torch.bfloat16)

    merged, checkpointed, fp8 = estimate("merged"), estimate("merged+ckpt"), estimate("merged+compile+fp8")
    assert checkpointed["step_gb"] < 0.7 * merged["step_gb"]
    assert checkpointed["resident_gb"] == merged["resident_gb"]
    # float8 weights are half of bf16; norms, biases, embedders and LoRA stay bf16.
    assert 0.45 * merged["resident_gb"] < fp8["resident_gb"] < 0.65 * merged["resident_gb"]
    assert fp8["notes"] and "eager" in fp8["notes"][0]


def test_offloaded_checkpoints_are_refused_not_guessed():
    with pytest.raises(ValueError, match="offloaded"):
        estimate_step_memory(parse_variants("merged+ckpt+offload")[0], SHAPE, torch.bfloat16)


def test_full_shape_estimate_needs_no_memory():
    """Two blocks of the real 3072-wide shape, 8192 image tokens: seconds on a CPU, nothing allocated."""
    shape = SHAPES["full"].replace(num_layers=2)
    result = estimate_step_memory(parse_variants("merged+ckpt")[0], shape, torch.bfloat16)
    # Two blocks of 3072-wide bf16 weights plus the embedders and output layer: ~1.45 GB.
    assert 1.3 < result["resident_gb"] < 1.6
    assert result["step_gb"] > 1.0


def test_estimate_only_predicts_the_full_width_on_a_cpu_and_writes_the_report(tmp_path, capsys):
    report_path, table_path = tmp_path / "estimate.json", tmp_path / "estimate.md"
    args = build_parser().parse_args(
        ["bench", "--size", "full", "--layers", "1", "--estimate-only", "--variants", "merged+ckpt,merged+ckpt+offload",
         "--json", str(report_path), "--markdown", str(table_path)]
    )  # fmt: skip
    assert main(args) == 0
    report = json.loads(report_path.read_text())
    assert report["settings"]["timed"] is False and report["settings"]["dtype"] == "bfloat16"
    estimated, offloaded = report["variants"]
    assert estimated["status"] == "estimated" and estimated["step_s"] is None
    assert estimated["est_peak_mem_gb"] == pytest.approx(estimated["memory_estimate"]["peak_gb"])
    assert offloaded["status"] == "skipped" and "offloaded" in offloaded["reason"]
    table = table_path.read_text()
    assert "| merged+ckpt | " in table and "est. peak GB" in table and "timed steps" not in table


def test_estimate_memory_adds_a_column_beside_the_measured_peak(tmp_path):
    report_path = tmp_path / "bench.json"
    args = build_parser().parse_args(
        ["bench", "--size", "tiny", "--layers", "1", "--threads", "1", "--warmup", "0", "--steps", "1",
         "--estimate-memory", "--variants", "merged", "--json", str(report_path)]
    )  # fmt: skip
    assert main(args) == 0
    (merged,) = json.loads(report_path.read_text())["variants"]
    assert merged["status"] == "ok" and merged["step_s"] > 0 and merged["est_peak_mem_gb"] > 0
    assert "est. peak GB" in markdown_table(json.loads(report_path.read_text()))


def test_a_full_shape_estimate_is_not_refused_on_a_cpu_but_timing_it_is():
    with pytest.raises(ValueError, match="--estimate-only"):
        main(build_parser().parse_args(["bench", "--size", "full", "--device", "cpu", "--variants", "merged"]))
