"""Predicted GPU and host memory of a LoRA training run, from shapes alone (no weights, no GPU).

What a training step holds on the GPU, and where each number comes from:

    transformer  frozen weights in their storage dtype (bf16; fp32 for precision=fp32; float8 + fp32 scales for fp8
                 storage), minus the
                 blocks streamed from host memory plus the 3 blocks in flight (the one computing, the one
                 prefetched, and in backward the recomputed block whose weights its backward still reads):
                 byte counts of the model built on the meta device (fusedit.bench.shapes, the real config).
    lora         LoRA weights (fp32) + their gradients (fp32) + optimizer state (fusedit.optim's bytes per
                 parameter: AdamW 8, 8-bit AdamW ~2) + the bf16 copies autocast keeps of them during a step
                 (none for precision=fp32, which runs without autocast). With callbacks=ema, the average:
                 torch's AveragedModel holds one copy of every LoRA parameter in its dtype (fp32) plus its
                 `n_averaged` int64 buffer (fusedit.training.ema averages the LoRA parameters alone, no PEFT
                 module or buffer is copied): EMA_BYTES_PER_PARAMETER per parameter + EMA_BUFFER_BYTES. Swapping
                 the average in for validation clones the raw weights once more, between steps, not at a step's
                 peak.
    activations  what the step adds on top of the weights (saved activations under the chosen checkpointing,
                 attention and backward transients) less the LoRA gradients and optimizer state it also holds:
                 fusedit.bench.memory's fake-tensor run (live storage bytes), at depth k and 2k for a checkpoint
                 interval k and extrapolated linearly to the real block count (activations are a per-block
                 pattern of period k; at the full shape this reproduces the 60-block fake-tensor runs to 0.01 GB,
                 tests/test_plan.py), at the largest bucket the data will produce, in the run's dtype (bf16
                 autocast, or fp32 throughout for precision=fp32).
    encoders     the Qwen2.5-VL text encoder and the VAE in the base dtype (bf16, fp32 for precision=fp32) when
                 they ride along on the GPU
                 (cache.enabled=false); 0 when training from the cache (encode-then-train). Their forward's own
                 activations come before the transformer step, not at its peak, and are not counted.

Host (pinned) memory: the streamed blocks. Host->GPU traffic per step: each streamed block twice (forward, and the
recompute in backward). GB = 1e9 bytes throughout, as `torch.cuda.max_memory_allocated` / 1e9. Not counted: the
CUDA context, cuBLAS/attention workspaces and allocator fragmentation; the plan keeps a margin for them
(fusedit.plan.choose.MARGIN).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from fusedit.bench.shapes import MMDIT, PIXELS_PER_TOKEN, QWEN21, QWEN21_SHAPES, SHAPES, BenchShape
from fusedit.errors import UserInputError
from fusedit.optim import STATE_BYTES_PER_PARAMETER

log = logging.getLogger(__name__)

GB = 1e9
IN_FLIGHT_BLOCKS = 3  # streamed blocks on the GPU at once (see the module docstring)
# Host->GPU copy throughput of pinned memory over a x16 link (GB/s, practical, ~80 % of the link's 32 / 64 GB/s),
# for the transfer floor of a streaming plan or an offloaded encoder: PCIe 4.0 x16 (RTX 4090, A100 PCIe), PCIe 5.0
# x16 (H100 / H200 PCIe). Assumed, not measured here; `--pcie-gbps` takes a name or a number.
PCIE_GBPS = {"pcie4_x16": 25.0, "pcie5_x16": 50.0}
DEFAULT_PCIE_GBPS = PCIE_GBPS["pcie4_x16"]


def parse_bandwidth(text: str) -> float:
    """A `--pcie-gbps` value (an argparse type): a link name of PCIE_GBPS or a positive number of GB/s."""
    import argparse

    if text in PCIE_GBPS:
        return PCIE_GBPS[text]
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected GB/s > 0 or one of {', '.join(PCIE_GBPS)}, got {text!r}")
    return value


# The dtypes a plan runs its frozen base in (precision=bf16 / fp8 share bf16; fp8 storage is its own byte count).
RUN_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Per LoRA parameter: fp32 weight, fp32 gradient, and under bf16 autocast its bf16 copy during the step.
LORA_BYTES_PER_PARAMETER = {"bf16": 4 + 4 + 2, "fp32": 4 + 4}
# fusedit.bench.memory steps as the trainer does (fusedit.step: fp32 LoRA weights, under bf16 autocast for bf16,
# torch AdamW): its fp32 gradients (4 B), fp32 moments (2 x 4 B) and autocast's bf16 copies of the LoRA weights
# (2 B, bf16 only) are part of its `step_gb`; they are counted by LORA_BYTES_PER_PARAMETER +
# STATE_BYTES_PER_PARAMETER and taken out here.
# callbacks=ema (fusedit.training.ema): AveragedModel's fp32 copy of each LoRA parameter, and its n_averaged buffer.
EMA_BYTES_PER_PARAMETER = 4
EMA_BUFFER_BYTES = 8
_BENCH_LORA_STEP_BYTES = {"bf16": 4 + 2 * 4 + 2, "fp32": 4 + 2 * 4}
_ESTIMATE_VERSION = (
    2  # bump when fusedit.bench.memory's method changes (2: the trainer's step, fp32 LoRA under autocast)
)


@dataclass(frozen=True)
class ModelFacts:
    """What the predictor needs to know about the model, all from configs and shapes.

    Bytes are of the frozen transformer by storage ("bf16", "fp32" or "fp8"): `block_bytes` per transformer block,
    `other_bytes` for the rest (embeddings, norm_out, proj_out). `lora_parameters`: trainable count at the run's
    rank and targets. `encoder_parameters`: text encoder + VAE parameter count; `vae_parameters` the VAE's part;
    `encoder_largest_leaf`: parameters of the text encoder's largest leaf module (what its layer-by-layer offload
    holds on the GPU at once, fusedit.plan.choose.encode_phase).
    """

    shape: BenchShape
    layout: str
    block_bytes: dict[str, int]
    other_bytes: dict[str, int]
    lora_parameters: int
    encoder_parameters: int
    vae_parameters: int = 0
    encoder_largest_leaf: int = 0

    @property
    def num_blocks(self) -> int:
        return self.shape.num_layers


@dataclass(frozen=True)
class Prediction:
    """Predicted memory of one plan (GB) and its host->GPU traffic per step."""

    transformer_gb: float
    lora_gb: float
    activations_gb: float
    encoders_gb: float
    host_gb: float
    moved_gb_per_step: float

    @property
    def peak_gpu_gb(self) -> float:
        return self.transformer_gb + self.lora_gb + self.activations_gb + self.encoders_gb

    def to_dict(self) -> dict:
        return {
            "predicted_peak_gpu_gb": round(self.peak_gpu_gb, 2),
            "predicted_host_gb": round(self.host_gb, 2),
            "parts_gb": {
                name: round(getattr(self, f"{name}_gb"), 2)
                for name in ("transformer", "lora", "activations", "encoders")
            },
            "host_to_gpu_gb_per_step": round(self.moved_gb_per_step, 2),
        }


# ---------------------------------------------------------------------------------------------------- model facts
def _count(model: torch.nn.Module) -> tuple[int, int, int]:
    """(frozen bytes inside transformer_blocks, frozen bytes elsewhere, trainable parameter count)."""
    block = other = trainable = 0
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.requires_grad:
            trainable += tensor.numel()
        elif name.startswith("transformer_blocks."):
            block += tensor.numel() * tensor.element_size()
        else:
            other += tensor.numel() * tensor.element_size()
    return block, other, trainable


@functools.lru_cache(maxsize=16)
def transformer_facts(shape: BenchShape, layout: str) -> tuple[dict[str, int], dict[str, int], int]:
    """(block_bytes, other_bytes, lora_parameters) of `shape`'s transformer, built on the meta device at 1 and 2
    blocks (per-block figures are the difference; the last block's text stream carries fewer adapters)."""
    from fusedit.bench.variants import Variant, build_variant

    block_bytes, other_bytes, lora = {}, {}, {}
    for storage in ("bf16", "fp32", "fp8"):
        variant = Variant(name=storage, layout=layout, fp8="storage" if storage == "fp8" else "none")
        dtype = torch.float32 if storage == "fp32" else torch.bfloat16
        counts = {
            depth: _count(build_variant(variant, shape.replace(num_layers=depth), torch.device("meta"), dtype))
            for depth in (1, 2)
        }
        block_bytes[storage] = counts[2][0] - counts[1][0]
        other_bytes[storage] = counts[1][1] + counts[1][0] - block_bytes[storage]
        lora[storage] = counts[1][2] + (counts[2][2] - counts[1][2]) * (shape.num_layers - 1)
    return block_bytes, other_bytes, lora["bf16"]


# The real Qwen-Image-Edit text encoder (Qwen2.5-VL-7B-Instruct's config.json), for `--size full` without files.
QWEN25_VL_7B = {
    "text_config": {
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
    },
    "vision_config": {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
    },
    "tie_word_embeddings": False,
}


# Qwen-Image-2.1's text encoder at full size, for `--size full` without files: Qwen3-VL-8B (its hidden size 4096 is
# 2.1's context_in_dim), config values as published for Qwen/Qwen3-VL-8B-Instruct (not read from a file here).
QWEN3_VL_8B = {
    "text_config": {
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "tie_word_embeddings": False,
    },
    "vision_config": {
        "depth": 27,
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_heads": 16,
        "out_hidden_size": 4096,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "deepstack_visual_indexes": [8, 16, 24],
    },
    "tie_word_embeddings": False,
}


@functools.lru_cache(maxsize=1)
def full_qwen21_encoder_counts() -> list[int]:
    """[all, VAE, largest text-encoder leaf] parameters of Qwen3-VL-8B (QWEN3_VL_8B) + 2.1's VAE (diffusers'
    default AutoencoderKLQwenImage21 config, 64 latent channels), built on the meta device."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLQwenImage21
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    with init_empty_weights():
        text_encoder = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**QWEN3_VL_8B))
        vae = AutoencoderKLQwenImage21()
    return encoder_counts(text_encoder, vae)


@functools.lru_cache(maxsize=1)
def full_encoder_counts() -> list[int]:
    """[all, VAE, largest text-encoder leaf] parameters of Qwen2.5-VL-7B + Qwen-Image's VAE (diffusers' default
    AutoencoderKLQwenImage config), built on the meta device: 8.29 B + 0.13 B; the largest leaf is the token
    embedding (152064 x 3584)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLQwenImage
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    with init_empty_weights():
        text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**QWEN25_VL_7B))
        vae = AutoencoderKLQwenImage()
    return encoder_counts(text_encoder, vae)


def encoder_counts(text_encoder: torch.nn.Module, vae: torch.nn.Module) -> list[int]:
    """[all, VAE, largest text-encoder leaf module] parameter counts (ModelFacts' encoder fields)."""
    vae_count = sum(p.numel() for p in vae.parameters())
    leaves = (module for module in text_encoder.modules() if not any(True for _ in module.children()))
    largest = max(sum(p.numel() for p in leaf.parameters(recurse=False)) for leaf in leaves)
    return [sum(p.numel() for p in text_encoder.parameters()) + vae_count, vae_count, largest]


def _header_counts(directory: Path) -> tuple[int, int]:
    """(parameters, largest tensor) of the safetensors files in `directory`, from their headers."""
    from fusedit.io import read_safetensors_header

    total = largest = 0
    for file in sorted(directory.glob("*.safetensors")):
        header, _ = read_safetensors_header(file)
        for spec in header.values():
            count = 1
            for size in spec["shape"]:
                count *= size
            total += count
            largest = max(largest, count)
    return total, largest


def pipeline_shape(model_path: str | os.PathLike, base: BenchShape) -> BenchShape:
    """`base` with the transformer dimensions of the pipeline at `model_path` (transformer/config.json). A
    Qwen-Image-2.1 transformer (`_class_name` QwenImage21Transformer2DModel) gives a 2.1 shape (family, its
    context_in_dim and mlp_ratio; `base`'s sizes, text tokens, batch and LoRA kept)."""
    from fusedit.model.module_map import QWEN21_TRANSFORMER_CLASS

    config = json.loads((Path(model_path) / "transformer" / "config.json").read_text())
    if config.get("_class_name") == QWEN21_TRANSFORMER_CLASS:
        return base.replace(
            name=Path(model_path).name,
            family=QWEN21,
            num_layers=config["num_layers"],
            num_attention_heads=config["num_attention_heads"],
            attention_head_dim=config["attention_head_dim"],
            joint_attention_dim=config["context_in_dim"],
            mlp_ratio=config.get("mlp_ratio", 3),
            axes_dims_rope=tuple(config["axes_dims_rope"]),
        )
    return base.replace(
        name=Path(model_path).name,
        num_layers=config["num_layers"],
        num_attention_heads=config["num_attention_heads"],
        attention_head_dim=config["attention_head_dim"],
        joint_attention_dim=config["joint_attention_dim"],
        axes_dims_rope=tuple(config["axes_dims_rope"]),
    )


def model_facts(
    shape: BenchShape, layout: str, model_path: str | os.PathLike | None = None, estimates: Estimates | None = None
) -> ModelFacts:
    """Facts of `shape`'s transformer; encoders from `model_path`'s safetensors headers, or the real Qwen-Image-Edit
    encoders built on the meta device when `model_path` is None (kept in `estimates`, a ~30 s build)."""
    block_bytes, other_bytes, lora = transformer_facts(shape, layout)
    if model_path is None:
        qwen21 = shape.family == QWEN21
        config, counts = (QWEN3_VL_8B, full_qwen21_encoder_counts) if qwen21 else (QWEN25_VL_7B, full_encoder_counts)
        key = json.dumps([_ESTIMATE_VERSION, "full encoder counts", config], sort_keys=True)
        encoders, vae, leaf = estimates.get(key, counts) if estimates else counts()
    else:
        (text, leaf), (vae, _) = (_header_counts(Path(model_path) / part) for part in ("text_encoder", "vae"))
        encoders = text + vae
    return ModelFacts(shape, layout, block_bytes, other_bytes, lora, int(encoders), int(vae), int(leaf))


# ---------------------------------------------------------------------------------------------------- activations
def _estimate_key(shape: BenchShape, layout: str, every: int, depth: int, run_dtype: str = "bf16") -> str:
    import diffusers

    fields = dataclasses.asdict(shape.replace(num_layers=depth, name=""))
    if shape.family == MMDIT:  # the MMDiT's keys as before 2.1 came in: kept estimates stay valid
        fields.pop("family")
        fields.pop("mlp_ratio")
    key = [_ESTIMATE_VERSION, torch.__version__, diffusers.__version__, layout, every, fields]
    # bf16 keys stay as they were before fp32 was planned, so that kept estimates stay valid.
    return json.dumps(key if run_dtype == "bf16" else [*key, run_dtype], sort_keys=True)


def _fake_step_gb(shape: BenchShape, layout: str, every: int, depth: int, run_dtype: str = "bf16") -> float:
    from fusedit.bench.memory import estimate_step_memory
    from fusedit.bench.variants import Variant

    variant = Variant(name=f"ckpt{every}", layout=layout, checkpoint_every=every)
    return estimate_step_memory(variant, shape.replace(num_layers=depth), RUN_DTYPES[run_dtype])["step_gb"]


class Estimates:
    """The slow figures (fake-tensor step runs, ~5-30 s each on 2 cores; the meta-built encoders, ~30 s), kept in a
    JSON file (`path`, optional) so that a second plan of the same shapes costs nothing."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else None
        self._cache: dict[str, float] = {}
        if self.path is not None and self.path.is_file():
            try:
                self._cache = json.loads(self.path.read_text())
            except (OSError, ValueError):
                log.warning("plan: ignoring unreadable estimate cache %s", self.path)

    def _save(self) -> None:
        if self.path is not None:
            from fusedit.io import write_json_atomic

            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, self._cache)

    def get(self, key: str, compute):
        if key not in self._cache:
            self._cache[key] = compute()
            self._save()
        return self._cache[key]

    def activations_gb(self, facts: ModelFacts, every: int, run_dtype: str = "bf16") -> float:
        """Step activations at `facts.shape` (all its blocks) under checkpointing of every `every`-th block, in
        `run_dtype` ("bf16": bf16 base under autocast; "fp32": precision=fp32)."""
        depth = max(every, 1)
        low, high = (
            self.get(
                _estimate_key(facts.shape, facts.layout, every, d, run_dtype),
                lambda d=d: _fake_step_gb(facts.shape, facts.layout, every, d, run_dtype),
            )
            for d in (depth, 2 * depth)
        )
        step_gb = low + (high - low) / depth * (facts.num_blocks - depth)
        return step_gb - facts.lora_parameters * _BENCH_LORA_STEP_BYTES[run_dtype] / GB


# ---------------------------------------------------------------------------------------------------- one plan
def predict(
    facts: ModelFacts,
    estimates: Estimates,
    *,
    fp8: bool,
    checkpoint_every: int,
    cache: bool,
    optim: str = "adamw",
    resident_blocks: int | None = None,
    fp32: bool = False,
    ema: bool = False,
) -> Prediction:
    """Predicted memory of a training step with these switches (module docstring for each part). `fp32`:
    precision=fp32 (fp32 base, encoders and activations, no autocast); not with `fp8`. `ema`: callbacks=ema."""
    if fp8 and fp32:
        raise ValueError("fp8 storage runs under bf16 autocast; it is not an fp32 plan")
    run_dtype = "fp32" if fp32 else "bf16"
    storage = "fp8" if fp8 else run_dtype
    block = facts.block_bytes[storage]
    streamed = 0 if resident_blocks is None else facts.num_blocks - min(resident_blocks, facts.num_blocks)
    on_gpu_blocks = facts.num_blocks - streamed + (min(IN_FLIGHT_BLOCKS, streamed) if streamed else 0)
    if optim not in STATE_BYTES_PER_PARAMETER:
        raise UserInputError(f"unknown optimizer {optim!r}; one of {sorted(STATE_BYTES_PER_PARAMETER)}")
    lora_bytes = facts.lora_parameters * (LORA_BYTES_PER_PARAMETER[run_dtype] + STATE_BYTES_PER_PARAMETER[optim])
    if ema:
        lora_bytes += facts.lora_parameters * EMA_BYTES_PER_PARAMETER + EMA_BUFFER_BYTES
    encoder_bytes_per_parameter = RUN_DTYPES[run_dtype].itemsize
    return Prediction(
        transformer_gb=(facts.other_bytes[storage] + on_gpu_blocks * block) / GB,
        lora_gb=lora_bytes / GB,
        activations_gb=estimates.activations_gb(facts, checkpoint_every, run_dtype),
        encoders_gb=0.0 if cache else facts.encoder_parameters * encoder_bytes_per_parameter / GB,
        host_gb=streamed * block / GB,
        moved_gb_per_step=2 * streamed * block / GB,
    )


def training_shape(
    base: BenchShape,
    target_size: tuple[int, int],
    edit_sizes: tuple[tuple[int, int], ...],
    batch: int,
    lora_rank: int,
    lora_targets: str,
) -> BenchShape:
    """`base` at the data's largest bucket (sizes in pixels, multiples of 16) and the run's batch and LoRA."""

    step = 2 * PIXELS_PER_TOKEN if base.family == QWEN21 else PIXELS_PER_TOKEN  # 2.1: whole 2x2-token slots

    def snap(size):
        return tuple(max(step, (side // step) * step) for side in size)

    return base.replace(
        target_size=snap(target_size),
        edit_sizes=tuple(snap(size) for size in edit_sizes),
        batch=batch,
        lora_rank=lora_rank,
        lora_targets=lora_targets,
    )


FULL = SHAPES["full"]
FULL21 = QWEN21_SHAPES["full"]
FULL_BY_FAMILY = {MMDIT: FULL, QWEN21: FULL21}
