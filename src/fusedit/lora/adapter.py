"""PEFT LoRA on the Qwen-Image transformer (either QKV layout), and its export as a diffusers LoRA file.

`add_lora` freezes the whole transformer and injects PEFT LoRA layers through diffusers' own
`PeftAdapterMixin.add_adapter`, so module names stay diffusers' names and the trained model is still a
`QwenImageTransformer2DModel`. The trainable set is then exactly the `lora_A`/`lora_B` weights.

`export_lora` writes, through fusedit.convert, `transformer.<module>.lora_A.weight` / `.lora_B.weight` (no
`.default.`) with the LoraConfig under the `lora_adapter_metadata` key, as diffusers' `save_lora_weights` does, so
`load_lora_weights` rebuilds the adapter with the trained rank *and* alpha (without that metadata diffusers
assumes alpha = rank).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from torch import nn

from fusedit.convert import LoraModule, LoraWeights, write_lora
from fusedit.convert.layout import LAYOUTS
from fusedit.lora.choices import LYCORIS_TYPES, changes_base, check_init, check_type, lycoris_problems
from fusedit.lora.targets import QWEN21_FAMILY, resolve_targets
from fusedit.model.merged_qkv import is_merged
from fusedit.model.merged_qwen21 import is_qwen21
from fusedit.model.module_map import ATTENTION, BLOCKS, LAST_BLOCK_UNUSED, block_module


def model_layout(transformer: nn.Module) -> str:
    return "merged_qkv" if is_merged(transformer) else "standard"


def target_family(transformer: nn.Module) -> str | None:
    """The family whose LoRA target names `transformer` takes: "qwen-image-2.1", or None for the MMDiT."""
    return QWEN21_FAMILY if is_qwen21(transformer) else None


# Parameter names of PEFT's adapters: LoRA/DoRA (`lora_A`, `lora_B`, `lora_magnitude_vector`), LoKr (`lokr_w1`...),
# LoHa (`hada_w1_a`...).
ADAPTER_PARAMETER_MARKERS = ("lora_", "lokr_", "hada_")


def is_adapter_parameter(name: str) -> bool:
    return any(marker in name for marker in ADAPTER_PARAMETER_MARKERS)


def has_lora(transformer: nn.Module) -> bool:
    """Whether `transformer` carries a PEFT adapter (LoRA, DoRA, LoKr or LoHa)."""
    return any(is_adapter_parameter(name) for name, _ in transformer.named_parameters())


def unused_modules(transformer: nn.Module, targets: list[str]) -> list[str]:
    """Targeted modules whose output cannot influence the transformer's output (left without LoRA: it would never
    get a gradient, see fusedit.model.module_map.LAST_BLOCK_UNUSED)."""
    last = len(getattr(transformer, BLOCKS)) - 1
    return [block_module(last, leaf) for leaf in LAST_BLOCK_UNUSED if leaf.removeprefix(f"{ATTENTION}.") in targets]


def add_lora(
    transformer: nn.Module,
    rank: int,
    alpha: float | None = None,
    targets: str | list[str] = "attn_mlp",
    dropout: float = 0.0,
    init: str = "default",
    use_rslora: bool = False,
    dtype: torch.dtype | None = torch.float32,
    init_from: LoraWeights | None = None,
    type: str = "lora",  # noqa: A002 - the config key's name (lora.type)
    decompose_factor: int = -1,
) -> nn.Module:
    """Freeze `transformer` and add one LoRA adapter on `targets` (translated to the model's layout). In place.

    `type` lokr / loha: PEFT's LoKr / LoHa instead (fusedit.lora.lycoris; `decompose_factor` is LoKrConfig's), and
    a LoKr whose merged to_qkv update would not split exactly into q/k/v factors is refused (ValueError).
    `init_from`: a LoRA in the model's layout (fusedit.lora.init_from.read_init_lora): its modules get its own
    ranks and scales and start from its factors; the other targeted modules start as `init` says.
    """
    _check_arguments(rank, alpha, dropout, init, type, init_from)
    _check_adapter_type(type, init, init_from, dropout, use_rslora, decompose_factor)
    if has_lora(transformer):
        raise ValueError("the transformer already carries LoRA layers; add_lora applies once")
    transformer.requires_grad_(False)
    target_modules = resolve_targets(targets, model_layout(transformer), target_family(transformer))
    if type in LYCORIS_TYPES:
        return _add_lycoris(transformer, type, rank, alpha, targets, target_modules, dtype, decompose_factor)
    rank_pattern, alpha_pattern = {}, {}
    if init_from is not None:
        # PEFT's scaling is alpha / r (alpha / sqrt(r) with rsLoRA): choose each module's alpha so that it equals
        # the file's scale, and its r the file's rank
        for module, mod in init_from.modules.items():
            rank_pattern[re.escape(module)] = mod.rank
            alpha_pattern[re.escape(module)] = mod.scale * (math.sqrt(mod.rank) if use_rslora else mod.rank)
    config = LoraConfig(
        r=int(rank),
        lora_alpha=float(alpha if alpha is not None else rank),
        lora_dropout=float(dropout),
        target_modules=target_modules,
        exclude_modules=unused_modules(transformer, target_modules) or None,
        init_lora_weights=True if init == "default" else init,
        use_rslora=bool(use_rslora),
        use_dora=type == "dora",
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )
    transformer.add_adapter(config)
    if not has_lora(transformer):
        raise ValueError(f"lora.targets {targets!r} matched no Linear of the transformer")
    for name, parameter in transformer.named_parameters():
        if "lora_" in name:
            if dtype is not None:
                parameter.data = parameter.data.to(dtype)
            parameter.requires_grad_(True)
    if init_from is not None:
        _copy_factors(transformer, init_from)
    if changes_base(init):  # the start s * B0 @ A0 was taken out of the base weight: kept for the export
        _keep_initial_factors(transformer)
    return transformer


def _check_adapter_type(adapter_type, init, init_from, dropout, use_rslora, decompose_factor) -> None:
    """Raise ValueError for a combination `lora.type` does not take (fusedit.lora.choices' rules)."""
    problems = lycoris_problems(adapter_type, init, init_from, dropout, use_rslora, "none", ())
    if problems:
        raise ValueError(problems[0])
    if adapter_type != "lokr" and int(decompose_factor) != -1:
        raise ValueError(f"lora.decompose_factor is LoKr's (lora.type=lokr), got it with lora.type={adapter_type}")


def _keep_initial_factors(transformer: nn.Module) -> None:
    """Record each adapter's starting (A0, B0) on the transformer: PiSSA / OLoRA took s * B0 @ A0 out of the base
    weight, and the export adds it back (so the stock model plus the exported LoRA equals the trained model)."""
    transformer._fusedit_initial_factors = {
        name: (module.lora_A["default"].weight.detach().clone(), module.lora_B["default"].weight.detach().clone())
        for name, module in transformer.named_modules()
        if isinstance(module, LoraLayer) and "default" in module.lora_A
    }


def _add_lycoris(transformer, adapter_type, rank, alpha, targets, target_modules, dtype, decompose_factor):
    from fusedit.lora.lycoris import check_exact_split, lycoris_config

    config = lycoris_config(
        adapter_type,
        rank,
        alpha if alpha is not None else rank,
        target_modules,
        unused_modules(transformer, target_modules) or None,
        decompose_factor,
    )
    transformer.add_adapter(config)
    if not has_lora(transformer):
        raise ValueError(f"lora.targets {targets!r} matched no Linear of the transformer")
    for name, parameter in transformer.named_parameters():
        if is_adapter_parameter(name):
            if dtype is not None:
                parameter.data = parameter.data.to(dtype)
            parameter.requires_grad_(True)
    check_exact_split(transformer)
    return transformer


def _check_arguments(rank, alpha, dropout, init: str, adapter_type: str, init_from) -> None:
    if int(rank) < 1:
        raise ValueError(f"lora.rank must be >= 1, got {rank}")
    if alpha is not None and float(alpha) <= 0:
        raise ValueError(f"lora.alpha must be > 0, got {alpha}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"lora.dropout must be in [0, 1), got {dropout}")
    check_init(init)
    check_type(adapter_type)
    if adapter_type == "dora" and (changes_base(init) or init_from is not None):
        raise ValueError(
            "lora.type=dora starts its magnitude from the base weight: not with lora.init=pissa/olora or lora.init_from"
        )
    if changes_base(init) and init_from is not None:
        raise ValueError(f"lora.init={init} starts from the base weight's own factors: not with lora.init_from")


def _copy_factors(transformer: nn.Module, weights: LoraWeights) -> None:
    layers = dict(transformer.named_modules())
    with torch.no_grad():
        for module, mod in weights.modules.items():
            layer = layers.get(module)
            if not isinstance(layer, LoraLayer) or "default" not in layer.lora_A:
                raise ValueError(f"lora.init_from: {module} got no LoRA layer (excluded from training?)")
            layer.lora_A["default"].weight.copy_(mod.A)
            layer.lora_B["default"].weight.copy_(mod.B)


def lora_parameters(transformer: nn.Module) -> dict[str, nn.Parameter]:
    """Name -> parameter for every adapter weight (the trainable set; LoKr / LoHa factors included)."""
    return {name: parameter for name, parameter in transformer.named_parameters() if is_adapter_parameter(name)}


def lora_weights(transformer: nn.Module, **metadata: str) -> LoraWeights:
    """The trained adapter as fusedit.convert's LoraWeights (module -> A, B, alpha), in the model's own layout.

    Each module's alpha is read back from PEFT's own `scaling` (alpha / r, or alpha / sqrt(r) with rsLoRA) as
    `scaling * rank`, so a file read with the usual scale = alpha / rank reproduces the trained update exactly.

    After a PiSSA / OLoRA initialisation (`lora.init`) the model's base weight is W_res = W - s * B0 @ A0, so the
    update to the original W is s * (B @ A - B0 @ A0) = s * [B | -B0] @ [A ; A0]: a LoRA of rank 2r with the same
    scale (PEFT's own PiSSA-to-LoRA conversion, `path_initial_model_for_weight_conversion`). Applied to the stock
    model it gives exactly the trained model's weights.

    A DoRA adapter (`lora.type=dora`) gives each module its magnitude vector m [out_features] too.
    """
    initial = getattr(transformer, "_fusedit_initial_factors", None) or {}
    modules: dict[str, LoraModule] = {}
    for name, module in transformer.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            scale = float(module.scaling["default"])
            A = module.lora_A["default"].weight.detach()
            B = module.lora_B["default"].weight.detach()
            if name in initial:
                A0, B0 = initial[name]
                A, B = torch.cat([A, A0.to(A)]), torch.cat([B, -B0.to(B)], dim=1)
            magnitude = (
                module.lora_magnitude_vector["default"].weight.detach() if module.use_dora.get("default") else None
            )
            modules[name] = LoraModule(A, B, scale * A.shape[0], magnitude)
    if not modules:
        raise ValueError("the transformer has no LoRA adapter (call add_lora first)")
    return LoraWeights(modules, format="diffusers", metadata={key: str(value) for key, value in metadata.items()})


def export_lora(transformer: nn.Module, path: str | os.PathLike, layout: str = "standard", **metadata: str) -> Path:
    """Write the adapter to `path` (atomically) as a diffusers LoRA in `layout`; `metadata` is stored with it.

    Conversion between the layouts is fusedit.convert's (exact: a merged to_qkv LoRA becomes q/k/v LoRAs sharing
    A with B split by rows, and a DoRA magnitude split by rows), and so is the file format (diffusers keys +
    LoraConfig metadata; DoRA adds `transformer.<module>.lora_magnitude_vector` and `use_dora`, which diffusers'
    `load_lora_weights` rebuilds). A LoKr / LoHa adapter is written with ComfyUI's keys, standard layout only
    (fusedit.lora.lycoris.export_lycoris).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"LoRA export layout must be one of {LAYOUTS}, got {layout!r}")
    from fusedit.lora.lycoris import export_lycoris, lycoris_layers

    if lycoris_layers(transformer):
        if layout != "standard":
            raise ValueError("a LoKr / LoHa adapter is exported in the standard layout only (ComfyUI's keys)")
        return export_lycoris(transformer, path, **metadata)
    return write_lora(lora_weights(transformer, **metadata), path, format="diffusers", layout=layout)


# --------------------------------------------------------------------------------------------------------------------
# LoRA inputs under autocast


def _cast_unless_autocast(self, x, dtype):
    if x is not None and torch.is_autocast_enabled(x.device.type):
        return x
    return type(self)._cast_input_dtype(self, x, dtype)


def lora_inputs_follow_autocast(model: nn.Module) -> int:
    """Skip PEFT's cast of a LoRA layer's input to the adapter dtype while autocast is on; returns the layer count.

    With fp32 adapters on a bf16 model PEFT runs `x.to(float32)` before `lora_A`: an fp32 copy of every adapted
    activation, which autocast casts straight back to bf16 for the GEMM. Under autocast that round trip is pure
    memory traffic and changes no value (bf16 -> fp32 -> bf16 is exact; `lora.dropout` > 0 scales in bf16 instead
    of fp32), so it is skipped; without autocast (fp32 training, inference) the cast stays, as fp32 weights need
    fp32 inputs there. The check runs per call, so checkpoint recomputation and compiled code agree with eager.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    count = 0
    for module in model.modules():
        if isinstance(module, BaseTunerLayer) and hasattr(module, "_cast_input_dtype"):
            module._cast_input_dtype = _cast_unless_autocast.__get__(module)
            count += 1
    return count
