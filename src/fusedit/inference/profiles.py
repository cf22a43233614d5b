"""Memory / speed profiles, each made of diffusers' own switches (conf/profile/*.yaml picks them).

- `offload`: `none` (the whole pipeline on `device`), `model` (`enable_model_cpu_offload`: one component on the
  GPU at a time), `sequential` (`enable_sequential_cpu_offload`: one leaf module at a time), `group`
  (`enable_group_offload`: groups of transformer blocks, or leaves, streamed in ahead of use on a CUDA stream).
- `fp8_storage`: the transformer's weights are stored as float8_e4m3fn and cast to the compute dtype layer by layer
  (`enable_layerwise_casting`); norms, embeddings and LoRA layers keep full precision (diffusers' default skips).
- `vae_tiling` / `vae_slicing`: decode (and encode) in tiles / one image at a time.
- `tf32`, `cudnn_benchmark`: the fast matmul/convolution paths on Ampere and later.

Order matters: LoRAs are loaded before this runs (PEFT needs the plain Linears, and the casting hooks must see the
adapter layers to skip them), casting before offloading (the offload hooks move whatever dtype they find).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from fusedit.devices import resolve_device, to_dtype
from fusedit.errors import UserInputError

OFFLOADS = ("none", "model", "sequential", "group")
# profile=auto: (minimum detected GPU memory in GB = 1e9 bytes, profile), first match wins. Each profile's own need:
# high_vram holds the bf16 transformer (~41 GB) and text encoder (~17 GB) at once; 24gb one fp8 component at a time
# (the ~20 GB transformer); 12gb streams one block at a time; 8gb one layer at a time. Not measured (docs/inference.md).
AUTO_PROFILES = ((70.0, "high_vram"), (20.0, "24gb"), (10.0, "12gb"), (0.0, "8gb"))
PROFILE_DIR = Path(__file__).resolve().parents[3] / "conf" / "profile"


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    return to_dtype(name, "profile.dtype")


# Qwen-Image-2.1's modular pipeline has no model CPU offload: the 24gb profile's GPUs get the next smaller profile
# (group offload) for it (preflight.QWEN21_REFUSED_OFFLOADS).
QWEN21_AUTO_INSTEAD = {"24gb": "12gb"}


def auto_profile_name(gpu_gb: float | None, family: str | None = None) -> str:
    """The profile `profile=auto` picks for a GPU of `gpu_gb` GB (None: no CUDA GPU -> cpu) and model `family`."""
    if gpu_gb is None:
        return "cpu"
    name = next(name for minimum, name in AUTO_PROFILES if gpu_gb >= minimum)
    if family == "qwen-image-2.1":
        return QWEN21_AUTO_INSTEAD.get(name, name)
    return name


def resolve_auto_profile(profile, family: str | None = None):
    """`profile` itself, or for `profile=auto` the profile file for the detected GPU (keys set next to `auto` on the
    command line, e.g. `profile.dtype=float32`, are kept on top; conf/profile/auto.yaml lists them as null)."""
    from omegaconf import OmegaConf

    if profile.get("name") != "auto":
        return profile
    gpu_gb = None
    if torch.cuda.is_available():
        gpu_gb = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 1e9
    chosen = OmegaConf.load(PROFILE_DIR / f"{auto_profile_name(gpu_gb, family)}.yaml")
    extra = {key: value for key, value in profile.items() if key != "name" and value is not None}
    return OmegaConf.merge(chosen, extra)


def check_profile(profile) -> tuple[str, torch.device]:
    """(offload, device) of `profile`, refusing an unknown offload or dtype and a device this machine lacks.

    The preflight calls this before the pipeline loads; `apply_profile` again on the loaded pipeline.
    """
    offload = profile.get("offload", "none")
    if offload not in OFFLOADS:
        raise UserInputError(f"profile.offload must be one of {OFFLOADS}, got {offload!r}")
    if profile.get("dtype") is not None:
        torch_dtype(profile.get("dtype"))
    device = resolve_device(profile.get("device", "cuda"), "profile.device", "profile=cpu (or profile.device=cpu)")
    if offload in ("model", "sequential") and device.type == "cpu":
        raise UserInputError(
            f"profile.offload={offload} moves weights between the CPU and a GPU; it needs a GPU device"
        )
    return offload, device


def _group_offload_modules(pipe, **kwargs) -> None:
    """What `DiffusionPipeline.enable_group_offload` does, for a modular pipeline (Qwen-Image-2.1's), which has no
    such method: each nn.Module component offloaded by its own `enable_group_offload` (diffusers models) or by
    diffusers' `apply_group_offloading` (the transformers text encoder). The modular pipeline's execution device
    then comes from the group hooks (`ModularPipeline._execution_device`)."""
    from diffusers.hooks import apply_group_offloading

    for component in pipe.components.values():
        if not isinstance(component, torch.nn.Module):
            continue
        if hasattr(component, "enable_group_offload"):
            component.enable_group_offload(**kwargs)
        else:
            apply_group_offloading(module=component, **kwargs)


def apply_profile(pipe, profile) -> dict:
    """Apply `profile` (a config node) to `pipe` in place. Returns what was applied, for the run's record."""
    offload, device = check_profile(profile)

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = bool(profile.get("tf32", False))
        torch.backends.cudnn.allow_tf32 = bool(profile.get("tf32", False))
        torch.backends.cudnn.benchmark = bool(profile.get("cudnn_benchmark", False))

    if profile.get("fp8_storage", False):
        compute_dtype = pipe.transformer.dtype
        pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)
    if profile.get("vae_tiling", False):
        pipe.vae.enable_tiling()
    if profile.get("vae_slicing", False):
        pipe.vae.enable_slicing()

    if offload == "none":
        pipe.to(device)
    elif offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        group = profile.get("group", {}) or {}
        offload_type = group.get("offload_type", "block_level")
        group_offload = getattr(pipe, "enable_group_offload", None) or functools.partial(_group_offload_modules, pipe)
        group_offload(
            onload_device=device,
            offload_device=torch.device("cpu"),
            offload_type=offload_type,
            num_blocks_per_group=group.get("num_blocks_per_group", 1) if offload_type == "block_level" else None,
            # Streams overlap the next group's transfer with this group's compute; they exist on CUDA only.
            use_stream=bool(group.get("use_stream", True)) and device.type == "cuda",
            non_blocking=device.type == "cuda",
        )
    return {
        "device": str(device),
        "offload": offload,
        "fp8_storage": bool(profile.get("fp8_storage", False)),
        "vae_tiling": bool(profile.get("vae_tiling", False)),
        "vae_slicing": bool(profile.get("vae_slicing", False)),
        "tf32": bool(profile.get("tf32", False)) and device.type == "cuda",
        "cudnn_benchmark": bool(profile.get("cudnn_benchmark", False)) and device.type == "cuda",
    }
