"""`infer(cfg)`: the body of `python infer.py` (tests call it directly with a composed config)."""

from __future__ import annotations

import platform
import time

import diffusers
import torch
from omegaconf import DictConfig, OmegaConf

import fusedit
from fusedit.families import QWEN_IMAGE_21, needs_edit_image
from fusedit.inference.enhance import enhance_prompt
from fusedit.inference.inputs import Job, load_rgb
from fusedit.inference.lora import load_loras
from fusedit.inference.outputs import comparison_sheet, save_image
from fusedit.inference.pipeline import build_pipeline, configure_scheduler, text_to_image_pipeline
from fusedit.inference.preflight import Plan, preflight
from fusedit.inference.profiles import apply_profile
from fusedit.io import write_json_atomic


def _call_kwargs(cfg: DictConfig, prompt: str, images: list, multi_image: bool, seed: int) -> dict:
    sampling = cfg.sampling
    kwargs = {
        "prompt": prompt,
        "negative_prompt": sampling.negative_prompt,
        "true_cfg_scale": float(sampling.true_cfg_scale),
        "num_inference_steps": int(sampling.steps),
        "height": sampling.height,
        "width": sampling.width,
        "max_sequence_length": int(sampling.max_sequence_length),
        # A CPU generator gives the same noise whatever device the pipeline runs on.
        "generator": torch.Generator("cpu").manual_seed(seed),
    }
    if images:
        kwargs["image"] = images if multi_image else images[0]
    return kwargs


def _generate(cfg: DictConfig, family: str, job_pipe, prompt: str, images: list, multi_image: bool, seed: int):
    """One output image: the MMDiT pipelines' `__call__`, or for 2.1 `fusedit.inference.qwen21.sample` (the modular
    pipeline, which training's validation images call too)."""
    if family != QWEN_IMAGE_21:
        return job_pipe(**_call_kwargs(cfg, prompt, images, multi_image, seed)).images[0]
    from fusedit.inference.qwen21 import sample

    sampling = cfg.sampling
    return sample(
        job_pipe,
        prompt,
        images,
        num_inference_steps=int(sampling.steps),
        seed=seed,
        guidance_scale=float(sampling.qwen21_true_cfg_scale),
        negative_prompt=sampling.negative_prompt,
        height=sampling.height,
        width=sampling.width,
        output_resolution=sampling.get("output_resolution"),
    )


def _run_record(cfg: DictConfig, family: str, pipe, lora_records: list, profile_record: dict) -> dict:
    """The JSON record's header: versions, the resolved config and how the pipeline was built; `images` fills later."""
    return {
        "fusedit_version": fusedit.__version__,
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "python": platform.python_version(),
        },
        "config": OmegaConf.to_container(cfg, resolve=True),
        "family": family,
        "pipeline": type(pipe).__name__,
        "layout": cfg.model.layout,
        "loras": lora_records,
        "profile": profile_record,
        "images": [],
    }


def _job_mode(job: Job, family: str) -> str:
    if job.images:
        return "edit"
    # "(edit model)": an Edit checkpoint run through QwenImagePipeline; 2.1 draws from text in its own pipeline.
    return "text-to-image (edit model)" if needs_edit_image(family) else "text-to-image"


def _enhanced_prompt(cfg: DictConfig, job_pipe, job: Job, images: list, entry: dict) -> str:
    """The prompt the text encoder rewrites (recorded in `entry`); the original when the rewrite comes back empty."""
    enhanced = enhance_prompt(job_pipe, job.prompt, images, cfg.enhance.system_prompt, int(cfg.enhance.max_new_tokens))
    print(f"[{job.name}] enhanced prompt: {enhanced!r}")
    entry["enhanced_prompt"] = enhanced
    if enhanced:
        return enhanced
    print(f"[{job.name}] the text encoder returned an empty rewrite; keeping the original prompt")
    return job.prompt


def _save_comparison_sheet(job: Job, images: list, output, path) -> None:
    """Inputs, output and (when the job has one) target side by side in one image at `path`."""
    panels = [(f"input {i + 1}" if len(images) > 1 else "input", image) for i, image in enumerate(images)]
    panels.append(("output", output))
    if job.target is not None:
        panels.append(("target", load_rgb(job.target)))
    save_image(comparison_sheet(panels), path)


def _run_job(cfg: DictConfig, plan: Plan, job_pipe, index: int, job: Job, multi_image: bool) -> dict:
    """Generate and save one job's image (and sheet); returns its entry in the run record."""
    started = time.perf_counter()
    images = [load_rgb(path) for path in job.images]
    entry = {
        "name": job.name,
        "source": job.source,
        "inputs": [str(path) for path in job.images],
        "target": str(job.target) if job.target else None,
        "prompt": job.prompt,
        "mode": _job_mode(job, plan.family),
    }
    prompt = _enhanced_prompt(cfg, job_pipe, job, images, entry) if cfg.enhance_prompt else job.prompt
    seed = int(cfg.sampling.seed) + index
    _label_progress_bar(plan.family, job_pipe, f"[{index + 1}/{len(plan.jobs)}] {job.name}")
    output = _generate(cfg, plan.family, job_pipe, prompt, images, multi_image, seed)

    image_path = plan.paths.image(job)
    save_image(output, image_path)
    entry.update({"prompt_used": prompt, "seed": seed, "output": str(image_path), "size": list(output.size)})
    if cfg.comparison_sheet:
        sheet_path = plan.paths.sheet(job)
        _save_comparison_sheet(job, images, output, sheet_path)
        entry["comparison_sheet"] = str(sheet_path)
    entry["seconds"] = round(time.perf_counter() - started, 3)
    return entry


def _label_progress_bar(family: str, pipe, label: str) -> None:
    """The denoise bar labelled `[i/n] name`; a 2.1 modular pipeline's loop sits below its top-level blocks."""
    if family == QWEN_IMAGE_21:
        from fusedit.inference.qwen21 import set_progress_bar_config

        set_progress_bar_config(pipe, desc=label)
    else:
        pipe.set_progress_bar_config(desc=label)


def infer(cfg: DictConfig, plan: Plan | None = None) -> dict:
    """Run every job the config describes; returns the JSON record it also writes next to the outputs.

    `plan` is `preflight(cfg)`'s result when the caller has already checked `cfg` (infer.py does, before importing
    this module); without it the checks run here, before any model is loaded.
    """
    plan = plan or preflight(cfg)
    jobs, paths = plan.jobs, plan.paths
    pipe, _ = build_pipeline(cfg.model.path, cfg.model.layout, cfg.profile.dtype, cfg.model.transformer, plan.family)
    lora_records = load_loras(pipe.transformer, plan.loras, fuse=bool(cfg.lora.get("fuse", False)))
    scheduler = OmegaConf.to_container(cfg.sampling.scheduler) if cfg.sampling.get("scheduler") else None
    scheduler_config = configure_scheduler(pipe, scheduler)  # before the T2I pipeline below shares it
    if all(not job.images for job in jobs):
        pipe = text_to_image_pipeline(pipe)
    # Built before the profile so both pipelines share the same (hooked) modules.
    t2i_pipe = text_to_image_pipeline(pipe) if any(not job.images for job in jobs) else None
    profile_record = apply_profile(pipe, cfg.profile)
    multi_image = isinstance(pipe, diffusers.QwenImageEditPlusPipeline)

    record = _run_record(cfg, plan.family, pipe, lora_records, profile_record)
    record["scheduler"] = {key: value for key, value in scheduler_config.items() if not key.startswith("_")}
    for index, job in enumerate(jobs):
        job_pipe = pipe if job.images else t2i_pipe
        record["images"].append(_run_job(cfg, plan, job_pipe, index, job, multi_image))
        # Rewritten after every image: an interrupted run still documents what it produced.
        write_json_atomic(paths.record, record)
    if len(jobs) == 1:
        print(f"wrote {record['images'][0]['output']} (record: {paths.record})")
    else:
        print(f"wrote {len(jobs)} images to {paths.folder} (record: {paths.record})")
    return record
