"""Run the variants side by side on one shape and report them (JSON + markdown)."""

from __future__ import annotations

import datetime
import gc
import os
import platform
import traceback

import torch

from fusedit.bench.flops import peak_tflops, step_flops
from fusedit.bench.measure import PeakMemory, count_qkv_matmuls, profile_step, summarize, synchronize, time_steps
from fusedit.bench.shapes import BenchShape, make_inputs
from fusedit.bench.variants import Variant, build_variant
from fusedit.lora.adapter import lora_parameters
from fusedit.model.perf import attention_backend, trim_prompt_padding
from fusedit.training.objective import FlowMatchObjective

SCHEMA = "fusedit.bench/1"
VARIANT_FIELDS = (
    "name", "status", "reason", "description", "step_s", "step_s_min", "step_s_max", "step_s_q1", "step_s_q3",
    "times_s", "samples_per_s", "tokens_per_s", "step_tflop", "tflops", "mfu", "peak_mem_gb", "peak_mem_kind",
    "matmul_calls", "matmul_calls_by_op", "qkv_matmuls_per_block", "sdpa_backend", "loss", "speedup_vs_standard",
)  # fmt: skip


def machine_info(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "device_name": None,
        "capability": None,
        "peak_bf16_tflops": None,
    }
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        info.update(
            device_name=name,
            capability=".".join(map(str, torch.cuda.get_device_capability(device))),
            peak_bf16_tflops=peak_tflops(name),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    return info


def make_step(model, inputs: dict, variant: Variant, optimizer, objective: FlowMatchObjective):
    """The LoRA training step: forward, flow-matching loss on the target tokens, backward, optimizer step."""
    prompt_embeds, prompt_mask = inputs["prompt_embeds"], inputs["prompt_mask"]
    if not variant.keep_mask:
        prompt_embeds, prompt_mask = trim_prompt_padding(prompt_embeds, prompt_mask)
    target_tokens = inputs["target"].shape[1]
    noisy = objective.noisy(inputs["target"], inputs["noise"], inputs["sigmas"])
    flow_target = objective.target(inputs["target"], inputs["noise"])
    hidden_states = torch.cat([noisy, inputs["condition"]], dim=1)
    timestep = inputs["sigmas"].to(hidden_states.dtype)

    def step() -> float:
        prediction = model(
            hidden_states=hidden_states,
            timestep=timestep,
            encoder_hidden_states=prompt_embeds,
            encoder_hidden_states_mask=prompt_mask,
            img_shapes=inputs["img_shapes"],
            return_dict=False,
        )[0][:, :target_tokens]
        loss = objective.loss(prediction, flow_target, inputs["sigmas"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def run_variant(
    variant: Variant,
    shape: BenchShape,
    device: torch.device,
    dtype: torch.dtype,
    warmup: int,
    steps: int,
    seed: int = 0,
    attention: str = "auto",
    profile: bool = True,
) -> dict:
    result = {"name": variant.name, "description": variant.description, "status": "ok", "reason": None}
    reason = variant.unsupported(device)
    if reason is not None:
        return {**result, "status": "skipped", "reason": reason}
    memory = PeakMemory(device)
    model = optimizer = None
    try:
        torch.manual_seed(seed)
        model = build_variant(variant, shape, device, dtype, seed)
        parameters = list(lora_parameters(model).values())
        fused = device.type == "cuda"
        optimizer = torch.optim.AdamW(parameters, lr=1e-5, fused=fused)
        inputs = make_inputs(shape, device, dtype, seed)
        step = make_step(model, inputs, variant, optimizer, FlowMatchObjective(weighting="none"))
        with attention_backend(attention):
            synchronize(device)
            memory.baseline()
            with memory:
                times, loss = time_steps(step, device, warmup, steps)
            counts = profile_step(step, device) if profile else {}
            qkv = count_qkv_matmuls(model, dtype)
        stats = summarize(times)
        flops = step_flops(shape, variant.layout)["step"]
        tflops = flops / stats["step_s"] / 1e12
        peak = peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
        loss = float(loss)
        result.update(
            stats,
            times_s=times,
            samples_per_s=shape.batch / stats["step_s"],
            tokens_per_s=shape.batch * shape.tokens / stats["step_s"],
            step_tflop=flops / 1e12,
            tflops=tflops,
            mfu=None if peak is None else tflops / peak,
            peak_mem_gb=memory.gb,
            peak_mem_kind=memory.kind,
            qkv_matmuls_per_block=qkv,
            loss=loss,
            **counts,
        )
    except torch.OutOfMemoryError as error:
        result.update(status="failed", reason=f"out of memory: {str(error).splitlines()[0]}")
    except Exception as error:  # one broken variant must not lose the others' numbers
        result.update(status="failed", reason=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
    finally:
        del model, optimizer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        torch._dynamo.reset()
    return result


def run_bench(
    shape: BenchShape,
    variants: list[Variant],
    device: torch.device | str,
    dtype: torch.dtype,
    warmup: int = 2,
    steps: int = 5,
    seed: int = 0,
    attention: str = "auto",
    command: str | None = None,
) -> dict:
    """Time every variant on the same shape, inputs and seed; returns the report dict (schema `fusedit.bench/1`)."""
    device = torch.device(device)
    if warmup < 0 or steps < 1:
        raise ValueError(f"need warmup >= 0 and steps >= 1, got warmup={warmup}, steps={steps}")
    results = [run_variant(v, shape, device, dtype, warmup, steps, seed, attention) for v in variants]
    standard = next((r for r in results if r["name"] == "standard" and r["status"] == "ok"), None)
    for result in results:
        if standard is not None and result["status"] == "ok":
            result["speedup_vs_standard"] = standard["step_s"] / result["step_s"]
        for field in VARIANT_FIELDS:
            result.setdefault(field, None)
    return {
        "schema": SCHEMA,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "machine": machine_info(device),
        "shape": shape.to_dict(),
        "settings": {
            "dtype": str(dtype).removeprefix("torch."),
            "warmup_steps": warmup,
            "timed_steps": steps,
            "seed": seed,
            "attention": attention,
            "optimizer": "AdamW over the LoRA parameters",
        },
        "flops": step_flops(shape, "merged_qkv"),
        "variants": results,
    }


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown_table(report: dict) -> str:
    """The report as a markdown table (plus the data-pipeline table when measured)."""
    lines = []
    if report.get("variants"):
        shape = report["shape"]
        lines.append(
            f"shape `{shape['name']}`: {shape['num_layers']} blocks, width {shape['inner_dim']}, "
            f"{shape['image_tokens']} image + {shape['text_tokens']} text tokens, batch {shape['batch']}, "
            f"LoRA r{shape['lora_rank']} on {shape['lora_targets']}; {report['settings']['dtype']}, "
            f"{report['settings']['warmup_steps']} warm-up + {report['settings']['timed_steps']} timed steps; "
            f"{report['flops']['step'] / 1e12:.4g} TFLOP/step (merged)"
        )
        lines.append("")
        lines.append(
            "| variant | step s (median) | min–max | vs standard | samples/s | tokens/s | TFLOP/s | MFU "
            "| peak mem GB | matmuls/step | QKV GEMMs/block (base+LoRA) | SDPA |"
        )
        lines.append("|" + "---|" * 12)
        for r in report["variants"]:
            if r["status"] != "ok":
                lines.append(f"| {r['name']} | {r['status']}: {r['reason']} |" + " |" * 10)
                continue
            qkv = r["qkv_matmuls_per_block"] or {}
            mem = _fmt(r["peak_mem_gb"], ".3f") + (" (RSS)" if r["peak_mem_kind"] == "cpu_rss_growth" else "")
            lines.append(
                f"| {r['name']} | {r['step_s']:.4f} | {r['step_s_min']:.4f}–{r['step_s_max']:.4f} "
                f"| {_fmt(r['speedup_vs_standard'], '.2f')}x | {r['samples_per_s']:.3g} | {r['tokens_per_s']:.4g} "
                f"| {r['tflops']:.3g} | {_fmt(r['mfu'], '.1%')} | {mem} | {_fmt(r['matmul_calls'], 'd')} "
                f"| {qkv.get('base', '–')}+{qkv.get('lora', '–')} | {r['sdpa_backend'] or '–'} |"
            )
    data = report.get("data")
    if data:
        if lines:
            lines.append("")
        lines.append(
            f"data pipeline: {data['samples']} samples ({data['images_per_sample']} images each, "
            f"{data['source']}), decode + resize + bucket + collate"
        )
        lines.append("")
        lines.append("| workers | images/s | samples/s |")
        lines.append("|---|---|---|")
        for row in data["loader"]:
            lines.append(f"| {row['num_workers']} | {row['images_per_s']:.1f} | {row['samples_per_s']:.1f} |")
        stages = data.get("stages_ms_per_image")
        if stages:
            lines.append("")
            lines.append("per image, one process: " + ", ".join(f"{k} {v:.1f} ms" for k, v in stages.items()))
    return "\n".join(lines) + "\n"
