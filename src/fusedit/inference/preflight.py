"""Check what `python infer.py` was asked to do before anything heavy is loaded, and plan it.

Importing diffusers takes seconds and loading a Qwen-Image pipeline minutes (a 20B transformer and a 7B text
encoder), so a missing input image, a mistyped LoRA path or a model folder of another family must be reported
before either. `preflight(cfg)` checks the jobs (inputs, prompts, CSV rows), the output paths, every LoRA file and
the model, reports every problem it finds at once, and returns the `Plan` that `infer()` carries out.
`python infer.py` calls it before importing the pipeline code; `infer(cfg)` calls it itself when given no plan,
so programmatic callers get the same checks, done once.

It runs in two stages. The first touches only the file system, image headers and safetensors headers (read by
safetensors with numpy: no torch): a missing or unreadable input, LoRA or model path is reported within a second
or so of start-up. The second asks `fusedit.detect` what the model, `model.transformer` and each LoRA are (from
headers and configs; detect imports torch, about 2 s) and checks that the jobs fit the model family and that the
profile's device exists. A CSV/JSONL input is read in the first stage, with `fusedit.data`'s reader and path
rule (neither imports torch).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from fusedit.errors import Refusal, UserFileNotFoundError, UserInputError
from fusedit.families import (
    EDIT_2511,
    PIPELINE_CLASSES,
    QWEN_IMAGE_21,
    TEXT_TO_IMAGE,
    edit_image_count_problem,
    is_edit_family,
)
from fusedit.inference.inputs import Job, collect_jobs, unreadable_images
from fusedit.inference.outputs import OutputPaths
from fusedit.pickle_files import pickle_refusal

log = logging.getLogger(__name__)

TRANSFORMER_KINDS = ("pipeline", "transformer", "model_file")  # what fusedit.model.load_transformer reads


@dataclass(frozen=True)
class LoraSpec:
    path: str
    scale: float = 1.0
    name: str | None = None
    key: str = "lora.path"  # the config key it came from, for error messages


@dataclass(frozen=True)
class Plan:
    """What a checked config asks `infer()` to do."""

    jobs: list[Job]
    paths: OutputPaths
    loras: list[LoraSpec]
    family: str


def _scale(value, key: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserInputError(f"{key} must be a number, got {value!r}") from None


def lora_specs(lora_cfg, loras_cfg, sampling_cfg=None) -> list[LoraSpec]:
    """The LoRAs a config asks for, in the order they are loaded: a few-step preset's `sampling.lightning_lora`
    first (at scale 1: the distilled sampler needs all of it), then `lora.path` (+ `lora.scale`) and the list
    `loras: [{path, scale, name}]` on top. A preset with a `lightning_lora` key (preset=lightning4/8) refuses null."""
    specs: list[LoraSpec] = []
    if sampling_cfg is not None and "lightning_lora" in sampling_cfg:
        path = sampling_cfg.get("lightning_lora")
        if not path:
            name = sampling_cfg.get("name", "lightning")
            raise UserInputError(
                f"preset={name} samples in {sampling_cfg.get('steps')} steps, which only a Lightning LoRA distilled "
                "for it makes work: set sampling.lightning_lora=<Qwen-Image-Lightning-...safetensors> (the "
                "lightx2v/Qwen-Image-Lightning file for your model)"
            )
        specs.append(LoraSpec(str(path), 1.0, "lightning", key="sampling.lightning_lora"))
    if lora_cfg is not None and lora_cfg.get("path"):
        scale = _scale(lora_cfg.get("scale", 1.0), "lora.scale")
        specs.append(LoraSpec(str(lora_cfg["path"]), scale, lora_cfg.get("name")))
    for index, item in enumerate(loras_cfg or []):
        key = f"loras[{index}]"
        if isinstance(item, str):
            specs.append(LoraSpec(item, key=f"{key}.path"))
            continue
        if not item.get("path"):
            raise UserInputError(f"{key} has no `path` (got {dict(item)})")
        scale = _scale(item.get("scale", 1.0), f"{key}.scale")
        specs.append(LoraSpec(str(item["path"]), scale, item.get("name"), key=f"{key}.path"))
    return specs


def lora_file(spec: LoraSpec) -> Path:
    """The safetensors file `spec` names (a file, or a folder holding exactly one), with a header that parses."""
    from safetensors import safe_open

    path = Path(spec.path).expanduser()
    if not path.exists():
        raise UserFileNotFoundError(f"{spec.key}={path} does not exist")
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise UserInputError(
                f"{spec.key}={path} is a folder; a LoRA folder must hold exactly one .safetensors file, found "
                f"{len(files)}"
            )
        path = files[0]
    refusal = pickle_refusal(path)
    if refusal:
        raise UserInputError(f"{spec.key}={refusal}")
    try:
        # The numpy reader parses and checks the header (tensor offsets against the file size) without torch.
        with safe_open(str(path), framework="numpy") as handle:
            keys = list(handle.keys())
    except Exception as error:  # safetensors' SafetensorError derives from Exception only
        raise UserInputError(f"{spec.key}={path} is not a readable safetensors file: {error}") from None
    if not keys:
        raise UserInputError(f"{spec.key}={path} holds no tensors")
    return path


def lycoris_file_type(path) -> str | None:
    """ "LoKr" / "LoHa" for a safetensors file of only that adapter's keys (header read only, no torch), else None."""
    from safetensors import safe_open

    from fusedit.convert.lora_formats import lycoris_type

    with safe_open(str(path), framework="numpy") as handle:
        return lycoris_type(handle.keys())


def lycoris_needs_fuse(key: str, path) -> str:
    """The one-line refusal of a LoKr / LoHa file without lora.fuse=true (fusedit.inference.lora says why)."""
    return (
        f"{key}={path} is a {lycoris_file_type(path)} adapter, which infer.py applies as a dense weight update only: "
        "set lora.fuse=true (its strength is then fixed for the run)"
    )


def _detect(path: Path, key: str) -> dict:
    from fusedit.detect import detect

    try:
        return detect(path)
    except (ValueError, OSError) as error:
        raise UserInputError(f"{key}={path} is not a Qwen-Image checkpoint: fusedit detect says: {error}") from None


def check_model_path(path) -> Path:
    """`model.path` exists and is a diffusers pipeline folder (the light half of `model_family`)."""
    if path is None or str(path) in ("", "???"):
        raise UserInputError(
            "model.path is required: a Qwen-Image diffusers pipeline folder "
            "(`fusedit download Qwen/Qwen-Image-Edit --to DIR`)"
        )
    path = Path(str(path)).expanduser()
    if not path.exists():
        raise UserFileNotFoundError(f"model.path={path} does not exist")
    if not (path / "model_index.json").is_file():
        raise UserInputError(
            f"model.path={path} is not a diffusers pipeline directory (no model_index.json). Inference needs the "
            "full pipeline (VAE, text encoder, tokenizer, scheduler): point model.path at it, and model.transformer "
            "at a separate transformer checkpoint if you have one (`fusedit download Qwen/Qwen-Image-Edit --to DIR`)."
        )
    return path


def model_family(path: str | os.PathLike) -> str:
    """The Qwen-Image family of the pipeline directory `path`, as `fusedit detect` reports it."""
    path = check_model_path(path)
    family = _detect(path, "model.path").get("family")
    if family not in PIPELINE_CLASSES:
        raise UserInputError(
            f"model.path={path}: `fusedit detect` reports family {family!r}; inference supports "
            f"{', '.join(PIPELINE_CLASSES)}"
        )
    return family


def _check_transformer(path: Path, family: str | None) -> None:
    """`model.transformer` holds transformer weights, and of the pipeline's family where the file says one."""
    report = _detect(path, "model.transformer")
    if report["kind"] not in TRANSFORMER_KINDS:
        raise UserInputError(
            f"model.transformer={path} is a {report['kind']}, not transformer weights"
            + (" (pass a LoRA as lora.path)" if report["kind"] == "lora" else "")
        )
    # Only Edit-2511 is visible in a transformer's own files (zero_cond_t in a folder's config, ComfyUI's marker
    # tensor in a single file); the other families share one transformer. A single file without the marker may
    # still be 2511 (not every tool writes it), so only a folder's config can say "not 2511".
    is_21 = report.get("family") == QWEN_IMAGE_21  # 2.1's own keys (SwiGLU) say it in every kind of file
    if family is not None and is_21 != (family == QWEN_IMAGE_21):
        raise UserInputError(
            f"model.transformer={path} is a {'Qwen-Image-2.1' if is_21 else 'Qwen-Image (MMDiT)'} transformer, but "
            f"model.path is a {family} pipeline; use the matching pipeline"
        )
    is_2511 = report.get("family") == EDIT_2511
    says_not_2511 = report["kind"] != "model_file" and not is_2511
    if family is not None and ((is_2511 and family != EDIT_2511) or (says_not_2511 and family == EDIT_2511)):
        source = report.get("family_source", "its config")
        raise UserInputError(
            f"model.transformer={path} is a {report.get('family') or 'pre-2511'} transformer ({source}), but "
            f"model.path is a {family} pipeline; use the matching pipeline (Qwen-Image-Edit-2511 for a 2511 "
            "transformer)"
        )


def _check_lora_kind(spec: LoraSpec, file: Path, family: str | None = None) -> None:
    """`file` is a LoRA, and none of its block modules is one only the other family (MMDiT / 2.1) has."""
    from fusedit.model.module_map import BLOCK_LINEARS, QWEN21_BLOCK_LINEARS

    report = _detect(file, spec.key)
    if report["kind"] != "lora":  # `lora_file` gives a file, so the other kind is a whole model's weights
        raise UserInputError(
            f"{spec.key}={file} holds transformer weights ({report.get('layers')} blocks), not a LoRA; other "
            "transformer weights go in model.transformer"
        )
    if family is None:
        return
    # Names both families share (attn.to_q, ...) are checked against the loaded model's shapes when attached.
    own, other = (
        (QWEN21_BLOCK_LINEARS, BLOCK_LINEARS) if family == QWEN_IMAGE_21 else (BLOCK_LINEARS, QWEN21_BLOCK_LINEARS)
    )
    foreign = sorted(set(report["target_modules"]) & (set(other) - set(own)))
    if foreign:
        raise UserInputError(
            f"{spec.key}={file} targets {', '.join(foreign)}, which a {family} transformer does not have: a LoRA "
            f"for {'the Qwen-Image MMDiT' if family == QWEN_IMAGE_21 else 'Qwen-Image-2.1'}?"
        )


def check_jobs_fit(jobs: list[Job], family: str) -> None:
    for job in jobs:
        # No input image with an edit model is a text-to-image job (the edit pipelines run without one).
        problem = edit_image_count_problem(len(job.images), family) if job.images else None
        if problem:
            hint = "; drop input= or use a Qwen-Image-Edit model" if family == TEXT_TO_IMAGE else ""
            raise UserInputError(f"{job.source}: {problem}{hint}")


MAX_SEQUENCE_LENGTH = 1024  # diffusers' Qwen-Image pipelines refuse a larger sampling.max_sequence_length


def check_prompt_lengths(
    jobs: list[Job], model_path, family: str, width=None, height=None, max_sequence_length: int = 512,
    long_prompt: str = "raise", output_resolution=None,
) -> list[Job]:  # fmt: skip
    """The jobs, each with a prompt that fits what the pipeline encodes: refused otherwise (`long_prompt="raise"`:
    UserInputError, one line per job naming its source, the count and the limit) or shortened to fit with a
    warning (`"truncate"`, data.long_prompt's choice for training); never cut silently.

    Counted with the pipeline's tokenizer and processor (`fusedit.data.prompt_length`; no weights). Edit jobs: the
    transformer's text positions left beside the images (each input at about 1 MP in its own aspect, as the edit
    pipelines size it, the output at `width` x `height` or the first input's size). Text-to-image jobs
    (QwenImagePipeline, also run for the jobs without an input on an edit model): `max_sequence_length`, where
    that pipeline's `encode_prompt` cuts the prompt embedding. Qwen-Image-2.1 jobs (with or without references):
    the RoPE positions left beside the references (`qwen21_text_positions_left`, each reference as the pipeline
    resizes it at `output_resolution`), counted with 2.1's template and Qwen3-VL processor.
    """
    from fusedit.data.prompt_length import LONG_PROMPT_CHOICES

    if long_prompt not in LONG_PROMPT_CHOICES:
        raise UserInputError(f"long_prompt must be one of {LONG_PROMPT_CHOICES}, got {long_prompt!r}")
    if not 1 <= int(max_sequence_length) <= MAX_SEQUENCE_LENGTH:
        raise UserInputError(
            f"sampling.max_sequence_length={max_sequence_length}: diffusers' Qwen-Image pipelines take 1 to "
            f"{MAX_SEQUENCE_LENGTH}"
        )
    limits = _PromptLimits(model_path, family, width, height, int(max_sequence_length), output_resolution)
    kept, problems = [], []
    for job in jobs:
        counter, sizes, limit, what = limits.of(job)
        length = counter.count(job.prompt, sizes)
        if length <= limit:
            kept.append(job)
        elif long_prompt == "truncate":
            text, shortened = counter.shorten(job.prompt, sizes, limit)
            log.warning(
                "%s: prompt of %d text tokens truncated to %d to fit %s (long_prompt=truncate)",
                job.source or job.name, length, shortened, what,
            )  # fmt: skip
            kept.append(dataclasses.replace(job, prompt=text))
        else:
            problems.append(
                f"{job.source or job.name}: the prompt is {length} text tokens (template and input images' vision "
                f"tokens included), but {what}; shorten it, or set long_prompt=truncate"
            )
    if problems:
        raise UserInputError("\n  ".join(problems))
    return kept


class _PromptLimits:
    """Per job: (counter, edit image sizes, the most text tokens its pipeline encodes whole, that limit in words)."""

    def __init__(self, model_path, family: str, width, height, max_sequence_length: int, output_resolution=None):
        self.model_path, self.family = model_path, family
        self.output = (int(width), int(height)) if width and height else None
        self.max_sequence_length = max_sequence_length
        self.output_resolution = output_resolution
        self._counters: dict[str, object] = {}

    def _counter(self, kind: str):
        from fusedit.data.prompt_length import PromptCounter, Qwen21PromptCounter, TextToImagePromptCounter

        if kind not in self._counters:
            counter_class = {"edit": PromptCounter, "t2i": TextToImagePromptCounter, "2.1": Qwen21PromptCounter}[kind]
            self._counters[kind] = counter_class(self.model_path)
        return self._counters[kind]

    def _qwen21(self, sizes: list[tuple[int, int]]):
        from fusedit.data.prompt_length import QWEN21_ROPE_POSITIONS, qwen21_reference_size, qwen21_text_positions_left
        from fusedit.inference.qwen21 import DEFAULT_OUTPUT_RESOLUTION

        resolution = int(self.output_resolution or DEFAULT_OUTPUT_RESOLUTION)
        limit = qwen21_text_positions_left([qwen21_reference_size(w, h, resolution) for w, h in sizes])
        what = (
            f"Qwen-Image-2.1's RoPE has {limit} text positions left beside the target and {len(sizes)} reference(s) "
            f"({QWEN21_ROPE_POSITIONS} in all)"
        )
        return self._counter("2.1"), sizes, limit, what

    def of(self, job: Job):
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions
        from PIL import Image

        from fusedit.data.prompt_length import TEXT_POSITIONS, text_positions_left

        sizes = []
        for image in job.images:
            with Image.open(image) as header:  # the header only; a regular file (checked in the first stage)
                sizes.append(header.size)
        if self.family == QWEN_IMAGE_21:
            return self._qwen21(sizes)
        if not (job.images and is_edit_family(self.family)):
            limit = self.max_sequence_length
            what = (
                f"the text-to-image pipeline encodes only the first {limit} (sampling.max_sequence_length, at most "
                f"{MAX_SEQUENCE_LENGTH}) and would cut the rest"
            )
            return self._counter("t2i"), [], limit, what
        condition = [calculate_dimensions(1024 * 1024, w / h)[:2] for w, h in sizes]
        limit = text_positions_left([self.output or tuple(map(int, condition[0])), *condition])
        what = f"the transformer has {limit} text positions left beside the images ({TEXT_POSITIONS} in all)"
        return self._counter("edit"), sizes, limit, what


class _Problems:
    """Refusals collected from independent checks, raised together."""

    def __init__(self):
        self.errors: list[Exception] = []

    def check(self, function: Callable, *args):
        """`function(*args)`, or None with its refusal recorded."""
        try:
            return function(*args)
        except Refusal as error:
            self.errors.append(error)
            return None

    def raise_if_any(self) -> None:
        if len(self.errors) == 1:
            raise self.errors[0]  # its own message and class (a missing file stays a FileNotFoundError)
        if self.errors:
            raise UserInputError("invalid inference config\n  " + "\n  ".join(str(error) for error in self.errors))


def _select(cfg: DictConfig, key: str):
    return OmegaConf.select(cfg, key, throw_on_missing=False)


def check_scheduler_overrides(model_path, overrides) -> None:
    """`sampling.scheduler` (a preset's scheduler settings) against the scheduler class `model_path` names in
    scheduler/scheduler_config.json. Raises UserInputError naming a key that class does not take."""
    import inspect

    import diffusers

    from fusedit.model.weight_files import read_json

    if not overrides:
        return
    config_file = Path(str(model_path)).expanduser() / "scheduler" / "scheduler_config.json"
    name = str(read_json(config_file).get("_class_name", ""))
    scheduler_class = getattr(diffusers, name, None)
    if scheduler_class is None:
        raise UserInputError(f"{config_file}: unknown scheduler class {name!r}")
    known = set(inspect.signature(scheduler_class.__init__).parameters) - {"self"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise UserInputError(f"sampling.scheduler: {name} takes no {unknown}; it takes {sorted(known)}")


def _folder_family(path) -> str | None:
    """The family named by the pipeline folder's JSON files, or None (then `model_family` reports why)."""
    from fusedit.families import folder_family

    try:
        return folder_family(Path(str(path)).expanduser())
    except (ValueError, OSError):
        return None


# diffusers' modular pipelines have no model / sequential CPU offload methods (their ComponentsManager does it
# differently); group offload is applied per component (fusedit.inference.profiles).
QWEN21_REFUSED_OFFLOADS = ("model", "sequential")
QWEN21_PRESETS = ("fast", "balanced", "quality")  # their steps apply; their true_cfg_scale is the MMDiT's


def check_family_options(cfg: DictConfig, family: str) -> None:
    """Options one family has and the other lacks, refused in one line each: for Qwen-Image-2.1 the Lightning
    presets (lightx2v's LoRAs are the MMDiT's), prompt enhancement (written for Qwen2.5-VL's chat) and model /
    sequential CPU offload (the 24gb profile); for the MMDiT `sampling.output_resolution`."""
    sampling = cfg.get("sampling") or {}
    profile = cfg.profile
    if family != QWEN_IMAGE_21:
        if sampling.get("output_resolution") is not None:
            raise UserInputError(
                "sampling.output_resolution is Qwen-Image-2.1's; the Qwen-Image pipelines take sampling.height / "
                "sampling.width"
            )
        return
    problems = []
    if "lightning_lora" in sampling:
        problems.append(
            f"preset={sampling.get('name')} is for the Qwen-Image MMDiT's Lightning LoRAs (lightx2v), not "
            f"Qwen-Image-2.1: use preset={'|'.join(QWEN21_PRESETS)}"
        )
    if cfg.get("enhance_prompt"):
        problems.append("enhance_prompt=true rewrites with Qwen2.5-VL's edit chat; it is not wired for Qwen-Image-2.1")
    if profile.get("offload", "none") in QWEN21_REFUSED_OFFLOADS:
        problems.append(
            f"profile={profile.get('name')} (offload={profile.get('offload')}) is not wired for Qwen-Image-2.1's "
            "modular pipeline (diffusers gives it no enable_model_cpu_offload / enable_sequential_cpu_offload): use "
            "profile=12gb or 8gb (group offload), high_vram or cpu"
        )
    if problems:
        raise UserInputError("\n  ".join(problems))


def preflight(cfg: DictConfig) -> Plan:
    """Check `cfg` (an `infer` config) without loading any model; raise one refusal listing every problem."""
    problems = _Problems()
    source = cfg.input
    jobs = problems.check(
        collect_jobs,
        OmegaConf.to_container(source) if OmegaConf.is_list(source) else source,
        cfg.prompt,
        OmegaConf.to_container(cfg.csv),
    )
    paths = None
    if jobs is not None:
        paths = problems.check(OutputPaths, cfg.output, jobs, bool(cfg.get("overwrite", False)))
        problems.errors.extend(UserInputError(message) for message in unreadable_images(jobs))
    model_ok = problems.check(check_model_path, _select(cfg, "model.path")) is not None
    # A Lightning preset on 2.1 is refused below as such, not asked for its (MMDiT) Lightning LoRA here.
    is_21 = model_ok and _folder_family(cfg.model.path) == QWEN_IMAGE_21
    specs = problems.check(lora_specs, cfg.lora, cfg.loras, None if is_21 else cfg.get("sampling")) or []
    lora_files = [problems.check(lora_file, spec) for spec in specs]
    fuse = bool((cfg.get("lora") or {}).get("fuse", False))
    problems.errors.extend(
        UserInputError(lycoris_needs_fuse(spec.key, file))
        for spec, file in zip(specs, lora_files, strict=True)
        if file is not None and not fuse and lycoris_file_type(file)
    )
    transformer = _select(cfg, "model.transformer")
    if transformer is not None and not Path(str(transformer)).expanduser().exists():
        problems.errors.append(UserFileNotFoundError(f"model.transformer={transformer} does not exist"))
        transformer = None
    problems.raise_if_any()

    # Second stage: fusedit.detect (imports torch) on what the first stage found.
    family = problems.check(model_family, cfg.model.path) if model_ok else None
    if transformer is not None:
        problems.check(_check_transformer, Path(str(transformer)).expanduser(), family)
    for spec, file in zip(specs, lora_files, strict=True):
        problems.check(_check_lora_kind, spec, file, family)
    if family is not None:
        problems.check(check_jobs_fit, jobs, family)
        sampling = cfg.get("sampling") or {}
        problems.check(check_scheduler_overrides, cfg.model.path, sampling.get("scheduler"))
        fitted = problems.check(
            check_prompt_lengths, jobs, cfg.model.path, family, sampling.get("width"), sampling.get("height"),
            sampling.get("max_sequence_length", 512), cfg.get("long_prompt", "raise"),
            sampling.get("output_resolution"),
        )  # fmt: skip
        jobs = fitted if fitted is not None else jobs
    from fusedit.inference.profiles import check_profile, resolve_auto_profile  # torch, imported by detect already

    with open_dict(cfg):  # profile=auto: the detected GPU's profile from here on (infer() reads cfg.profile)
        cfg.profile = resolve_auto_profile(cfg.profile, family)
    problems.check(check_profile, cfg.profile)
    if family is not None:
        problems.check(check_family_options, cfg, family)
    problems.raise_if_any()
    return Plan(jobs=jobs, paths=paths, loras=specs, family=family)
