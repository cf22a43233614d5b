"""The merged model inside diffusers' and PEFT's own API: the entry points that name q/k/v answer for `to_qkv`.

`fuse_qkv` rewrites the model in place and keeps its class, so pipelines, `save_config` and diffusers' own tests
still see a `QwenImageTransformer2DModel`. The API that names the separate q/k/v projections gets instance-level
answers here, installed by `fuse_qkv` and removed by `unfuse_qkv` (instance attributes shadow the class's):

- `save_pretrained` writes the standard layout: the merged tensors are split exactly (bit for bit), so stock
  `QwenImageTransformer2DModel.from_pretrained` loads the directory, and `fusedit.load_transformer` reads it in
  either layout. The weight-format question (a config identical to a stock one over merged keys loads as garbage in
  stock diffusers) never arises.
- `add_adapter` translates standard target names: a whole merge group (`to_q`, `to_k`, `to_v`; Qwen-Image-2.1's
  `img_mlp.gate_layer`, `img_mlp.proj`) becomes the merged projection (`to_qkv`; `img_mlp.gate_up_proj`), as
  `fusedit.lora.targets` does for training. A partial group (`["to_q"]`) or a regex that matches a part's name is
  refused, naming the merged modules: PEFT would adapt a silent subset otherwise. The groups are read from the
  model's own merged modules, so one translation serves both families.
- `load_lora_adapter` (also `pipe.load_lora_weights`) converts a standard-layout LoRA exactly to the merged layout
  (fusedit.convert), keeping every module's alpha / rank. diffusers alone would load only its non-q/k/v modules.
- every attention module's `set_processor` (what `set_attn_processor` calls) refuses processors that are not
  `MergedQKVAttnProcessor`: stock ones read `attn.to_q` and would fail mid-forward. The message points at
  `unfuse_qkv`.
- `_tp_plan`: the class plan with each q/k/v triple replaced by its merged projection sharded with diffusers'
  `PackedColwiseParallel([1, 1, 1])`, so each rank gets its own heads of q, k *and* v (a plain column split of
  `to_qkv` would hand rank 0 all of q and half of k).

- PEFT's own `inject_adapter_in_model` / `get_peft_model` match target names against `named_modules()` without
  asking the model, so a standard name matching nothing would leave a silent subset adapted. Each merged attention
  module therefore holds a `MergedPart` under every q/k/v name it lacks (`to_q`, ..., `add_v_proj`; no parameters,
  nothing in the state dict): PEFT matches it, cannot adapt it (not a layer type it knows) and raises ValueError
  with its repr, which names the merged projection to target. Calling it raises the same explanation.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Iterable

from diffusers.hooks.tensor_parallel import PackedColwiseParallel
from torch import nn

from fusedit.convert.layout import PART_TO_MERGED, ProjRole, proj_role, split_param_key
from fusedit.convert.lora_formats import module_from_kohya
from fusedit.model.module_map import ATTENTION, QKV_GROUPS, QWEN21_MLP, QWEN21_MLP_GROUP

# Instance attributes fuse_qkv sets on the model (and unfuse_qkv removes); the MMDiT's attention modules get
# SET_PROCESSOR and a MergedPart under each part name of QKV_GROUPS.
MODEL_OVERRIDES = ("save_pretrained", "add_adapter", "load_lora_adapter", "_tp_plan")
SET_PROCESSOR = "set_processor"
MERGED_NAMES_HELP = ", ".join(f"{merged} (= {' + '.join(parts)})" for merged, parts in QKV_GROUPS.items())
# A key inside a merged projection: group 2 is what follows the module name (weight, bias, base_layer.weight, ...).
# Qwen-Image-2.1's merged SwiGLU (`img_mlp.gate_up_proj`, fusedit.model.merged_qwen21) included.
_INSIDE_MERGED = re.compile(
    rf"^(.*\.(?:{ATTENTION}\.(?:{'|'.join(QKV_GROUPS)})|{QWEN21_MLP}\.(?:{'|'.join(QWEN21_MLP_GROUP)})))\.(.+)$"
)


# ------------------------------------------------------------------------------------------- save_pretrained
def standard_state_dict_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """State-dict post hook: every merged `weight`/`bias` replaced, in place and in order, by its q, k, v thirds
    (2.1's `gate_up_proj`: its gate and up halves).

    The parts are views, not copies (safetensors writes non-overlapping views of one tensor as separate tensors).
    Raises ValueError for anything else stored under a merged projection (a LoRA wrapper's
    `base_layer`, fp8 `weight_scale`): no stock loader could read it back.
    """
    items = list(state_dict.items())
    state_dict.clear()
    for key, tensor in items:
        match = _INSIDE_MERGED.match(key) if key.startswith(prefix) else None
        if match is None:
            state_dict[key] = tensor
            continue
        if match[2] not in ("weight", "bias"):
            raise ValueError(
                f"save_pretrained: {key} is not a plain Linear parameter of a merged projection, so it has no "
                "standard-layout equivalent: unload LoRA adapters (save them with fusedit.lora.export_lora) and save "
                "before fp8 storage, or call fusedit.model.unfuse_qkv first"
            )
        attn_module, param = match[1], match[2]
        role = proj_role(attn_module)
        parts = role.parts
        for part, third in zip(parts, tensor.chunk(len(parts), dim=0), strict=True):
            state_dict[f"{role.attn_prefix}{part}.{param}"] = third


def _save_pretrained(model: nn.Module, save_directory, *args, **kwargs):
    """diffusers' own `save_pretrained`, writing the standard layout (see `standard_state_dict_hook`)."""
    handle = model.register_state_dict_post_hook(standard_state_dict_hook)
    try:
        return type(model).save_pretrained(model, save_directory, *args, **kwargs)
    finally:
        handle.remove()


# ------------------------------------------------------------------------------------------------ LoRA targets
def _merge_parts(standard_modules: Iterable[str]) -> dict[str, ProjRole]:
    """Each part's leaf name (`to_q`, `gate_layer`, ...) -> the role of one module of it, from the standard module
    paths of a merged model (`standard_module_names`): the model says which merge groups it has."""
    parts: dict[str, ProjRole] = {}
    for name in standard_modules:
        role = proj_role(name)
        if role is not None:
            parts.setdefault(role.proj, role)
    return parts


def _merged_name(role: ProjRole) -> str:
    # As a PEFT target: attention leaves stand alone (`to_qkv`); the 2.1 SwiGLU's keep `img_mlp.` (`proj` alone
    # would not say which module it is).
    return role.group if role.parent == ATTENTION else f"{role.parent}.{role.group}"


def merged_names_help(standard_modules: Iterable[str]) -> str:
    """`to_qkv (= to_q + to_k + to_v), ...`: the merged projections of the model whose standard module paths are
    `standard_modules`, each with its parts (MERGED_NAMES_HELP for the MMDiT)."""
    groups = {_merged_name(role): role for role in _merge_parts(standard_modules).values()}
    return ", ".join(
        f"{name} (= {' + '.join(name.replace(role.group, part) for part in role.parts)})"
        for name, role in groups.items()
    )


def _refuse_qkv_names(what: str, names: Iterable[str], remedy: str, help_text: str = MERGED_NAMES_HELP) -> None:
    raise ValueError(
        f"{what} names separate projections {sorted(names)}, but this transformer is merged (fusedit.fuse_qkv): "
        f"its projections are {help_text}. {remedy}"
    )


def translate_target_modules(targets, standard_modules: Iterable[str]):
    """PEFT `target_modules` for the merged model: whole merge groups become the merged name; partial ones refused.

    `targets` is PEFT's list/set of suffixes (or a regex string, or None); `standard_modules` the standard module
    paths of the model (`standard_module_names`), which say what its merge groups are. A list entry names a part
    when its last component is one (`to_q`, `attn.to_q`, `transformer_blocks.0.attn.to_q`; on Qwen-Image-2.1 also
    `gate_layer` / `img_mlp.proj`); the parts of one group with the same leading path become one entry of the
    merged name (`to_qkv`, `img_mlp.gate_up_proj`). A regex cannot be translated: one that fully matches any of
    `standard_modules` is refused. Raises ValueError naming the merged modules.
    """
    remedy = "Target the merged projection (all its parts) or call fusedit.model.unfuse_qkv first."
    if targets is None:
        return None
    standard_modules = list(standard_modules)
    help_text = merged_names_help(standard_modules)
    if isinstance(targets, str):
        matched = [name for name in standard_modules if re.fullmatch(targets, name)]
        if matched:
            _refuse_qkv_names(
                f"target_modules regex {targets!r}", {name.rpartition(".")[2] for name in matched}, remedy, help_text
            )
        return targets
    parts = _merge_parts(standard_modules)
    groups: dict[tuple[str, str], set[str]] = {}
    translated = []
    for target in targets:
        head, _, leaf = target.rpartition(".")
        role = parts.get(leaf)
        if role is None:
            translated.append(target)
            continue
        groups.setdefault((head, role.group), set()).add(leaf)
        name = f"{head}.{role.group}" if head else role.group
        if name not in translated:
            translated.append(name)
    partial = {
        f"{head}.{part}" if head else part
        for (head, group), found in groups.items()
        if len(found) < len(parts[next(iter(found))].parts)
        for part in found
    }
    if partial:
        _refuse_qkv_names("target_modules", partial, remedy, help_text)
    return type(targets)(translated) if isinstance(targets, set) else translated


def _check_patterns(config, standard_modules: list[str]) -> None:
    # rank_pattern / alpha_pattern / exclude_modules naming a part would silently not apply to the merged module.
    parts, help_text = _merge_parts(standard_modules), merged_names_help(standard_modules)
    for field in ("rank_pattern", "alpha_pattern"):
        named = [key for key in getattr(config, field, None) or {} if key.rpartition(".")[2] in parts]
        if named:
            _refuse_qkv_names(f"LoraConfig.{field}", named, "Key the pattern by the merged name.", help_text)
    excluded = getattr(config, "exclude_modules", None)
    if isinstance(excluded, str):
        hits = [name for name in standard_modules if re.fullmatch(excluded, name)]
    else:
        hits = [name for name in excluded or () if name.rpartition(".")[2] in parts]
    if hits:
        _refuse_qkv_names("LoraConfig.exclude_modules", hits, "Exclude the merged projection instead.", help_text)


def standard_module_names(model: nn.Module) -> list[str]:
    """The module paths the standard model would have where this merged model has a merged projection
    (`to_qkv` / `add_qkv_proj`; 2.1's `img_mlp.gate_up_proj`)."""
    names = []
    for name, _ in model.named_modules():
        role = proj_role(name)
        if role is not None and role.merged:
            names.extend(f"{role.attn_prefix}{part}" for part in role.parts)
    return names


def translate_adapter_config(model: nn.Module, config):
    """A copy of the PEFT config `config` whose names fit the merged `model` (see `translate_target_modules`)."""
    standard = standard_module_names(model)
    _check_patterns(config, standard)
    translated = copy.deepcopy(config)
    translated.target_modules = translate_target_modules(config.target_modules, standard)
    return translated


def _add_adapter(model: nn.Module, adapter_config, adapter_name: str = "default"):
    return type(model).add_adapter(model, translate_adapter_config(model, adapter_config), adapter_name)


def standard_qkv_lora_modules(keys: Iterable[str]) -> list[str]:
    """The standard q/k/v modules a LoRA's keys adapt (diffusers/PEFT `….to_q.lora_A…`, kohya `…_attn_to_q.…`)."""
    found = set()
    for key in keys:
        if key.startswith("lora_unet_"):
            module = module_from_kohya(key.partition(".")[0]) or ""
        else:
            module = key.split(".lora_", 1)[0] if ".lora_" in key else split_param_key(key)[0]
        role = proj_role(module)
        if role is not None and not role.merged:
            found.add(module)
    return sorted(found)


# diffusers' load_lora_adapter keywords that say where to read the LoRA from (handed to its own _fetch_state_dict)
_FETCH_KWARGS = (
    "cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder", "weight_name",
    "use_safetensors",
)  # fmt: skip


def _load_lora_adapter(model: nn.Module, source, prefix: str | None = "transformer", hotswap: bool = False, **kwargs):
    """diffusers' `load_lora_adapter`, with a standard-layout LoRA converted exactly to the merged layout first.

    The LoRA is read by diffusers' own `_fetch_state_dict` (dict, file, folder or hub id; pickles refused) and
    filtered by `prefix` as diffusers does. Without standard q/k/v modules it goes to diffusers unchanged. With them,
    fusedit.convert reads it (alphas from `metadata`, diffusers' LoraConfig, else alpha = rank as diffusers assumes)
    and merges each q/k/v triple into one `to_qkv` adapter of rank r_q + r_k + r_v whose product is exactly the
    three stacked (docs/conversion.md), so every module keeps its strength.
    """
    from diffusers.loaders.lora_base import _fetch_state_dict

    from fusedit.convert import TO_MERGED, convert_lora_layout
    from fusedit.convert.lora_formats import lora_from_state_dict, peft_adapter  # the same adapter inference loads

    load = type(model).load_lora_adapter
    fetch = {name: kwargs[name] for name in _FETCH_KWARGS if name in kwargs}
    state_dict, metadata = _fetch_state_dict(
        pretrained_model_name_or_path_or_dict=source,
        user_agent={"file_type": "attn_procs_weights", "framework": "pytorch"},
        allow_pickle=False,
        metadata=kwargs.get("metadata"),
        **{"use_safetensors": None, "weight_name": None, "local_files_only": None, "cache_dir": None,
           "force_download": False, "proxies": None, "token": None, "revision": None, "subfolder": None, **fetch},
    )  # fmt: skip
    if prefix is not None:
        state_dict = {k.removeprefix(f"{prefix}."): v for k, v in state_dict.items() if k.startswith(f"{prefix}.")}
        if metadata is not None:
            metadata = {k.removeprefix(f"{prefix}."): v for k, v in metadata.items() if k.startswith(f"{prefix}.")}
    standard = standard_qkv_lora_modules(state_dict)
    if not standard:
        return load(model, source, prefix=prefix, hotswap=hotswap, **kwargs)
    what, help_text = "this LoRA", merged_names_help(standard_module_names(model))
    if kwargs.get("network_alphas"):
        _refuse_qkv_names(
            what, standard, "It comes with network_alphas; load it with fusedit.inference.load_loras.", help_text
        )
    try:
        weights = lora_from_state_dict(state_dict, adapter_config=metadata or None, what="LoRA")
        converted_state_dict, config = peft_adapter(convert_lora_layout(weights, TO_MERGED))
        problem = None
    except ValueError as error:
        problem = str(error)
    if problem is not None:
        remedy = f"It cannot be converted to the merged layout ({problem}); unfuse_qkv first."
        _refuse_qkv_names(what, standard, remedy, help_text)
    rest = {name: value for name, value in kwargs.items() if name not in (*_FETCH_KWARGS, "metadata")}
    return load(model, converted_state_dict, prefix=None, hotswap=hotswap, metadata=config, **rest)


# ------------------------------------------------------------------------------------------ attention processors
def _set_processor(attn: nn.Module, merged_processor: type, processor) -> None:
    if not isinstance(processor, merged_processor):
        raise TypeError(
            f"{type(processor).__name__} reads attn.to_q/to_k/to_v, which this merged model does not have "
            f"({MERGED_NAMES_HELP}). Keep fusedit's MergedQKVAttnProcessor (attention backends still switch with "
            "set_attention_backend), or call fusedit.model.unfuse_qkv before setting a standard processor."
        )
    type(attn).set_processor(attn, processor)


# ----------------------------------------------------------------------------------------------- tensor parallel
def merged_tp_plan(class_plan: dict | None) -> dict | None:
    """diffusers' `_tp_plan` for the merged model: each q/k/v triple -> its merged name, packed column-wise.

    Packed with `PackedColwiseParallel([1, 1, 1])`: q, k and v are each split across the ranks, so a rank holds the
    same heads of all three, as the standard model's three column-wise splits give it. Raises ValueError when the
    class plan shards a q/k/v part other than column-wise (a layout this translation does not know).
    """
    if class_plan is None:
        return None
    plan = {}
    for pattern, style in class_plan.items():
        head, _, leaf = pattern.rpartition(".")
        if leaf not in PART_TO_MERGED:
            plan[pattern] = style
            continue
        if style != "colwise":
            raise ValueError(f"_tp_plan shards {pattern} as {style!r}; only column-wise q/k/v can be merged")
        merged = PART_TO_MERGED[leaf][0]
        plan[f"{head}.{merged}"] = PackedColwiseParallel(blocks=[1] * len(QKV_GROUPS[merged]))
    return plan


# ------------------------------------------------------------------------------------- PEFT's own injection
class MergedPart(nn.Module):
    """Stands under a part's name (`to_q`, ...; 2.1's `img_mlp.gate_layer`) in a module whose merged projection
    replaced it.

    PEFT's `inject_adapter_in_model` / `get_peft_model` match `target_modules` against module names without asking
    the model: a standard name given there would match nothing on a merged model and PEFT would adapt the other
    targets only (`["to_q", "to_k", "to_v", "to_out.0"]` -> `to_out.0` alone), or say merely "not found". With this
    module in place PEFT matches the name, cannot adapt it (no parameters: not a layer type any PEFT tuner knows)
    and raises `ValueError("Target module <this repr> is not supported ...")`; the repr says what to target. It is
    registered first in its parent module, so PEFT meets it before that module's other projections. No parameters
    or buffers: the state dict, the forward and every size are as without it.
    """

    def __init__(self, part: str, merged: str):
        super().__init__()
        self.part, self.merged = part, merged

    def extra_repr(self) -> str:
        return (
            f"{self.part} is merged into {self.merged} (fusedit.fuse_qkv): target {self.merged}, or use "
            "transformer.add_adapter (it translates whole merge groups), or call fusedit.model.unfuse_qkv first"
        )

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"{self.part} is no layer of a merged transformer: {self.extra_repr()}")


def add_merged_parts(module: nn.Module, groups: dict[str, tuple[str, ...]]) -> None:
    """Register a `MergedPart` in `module` under every part name of `groups` (merged name -> its parts, as
    fusedit.model.module_map gives them), first in `module._modules`: PEFT walks named_modules() in order and
    adapts as it goes. Idempotent."""
    names = {part: merged for merged, parts in groups.items() for part in parts}
    others = [(name, child) for name, child in module._modules.items() if name not in names]
    module._modules.clear()
    for part, merged in names.items():
        module._modules[part] = MergedPart(part, merged)
    module._modules.update(others)


def remove_merged_parts(module: nn.Module) -> None:
    """Take every `MergedPart` out of `module` (its direct children)."""
    for name in [name for name, child in module._modules.items() if isinstance(child, MergedPart)]:
        del module._modules[name]


# --------------------------------------------------------------------------------------------------- install
def install_model_api(model: nn.Module) -> None:
    """The model-level answers both families share: `save_pretrained`, `add_adapter`, `load_lora_adapter`."""
    model.save_pretrained = functools.partial(_save_pretrained, model)
    model.add_adapter = functools.partial(_add_adapter, model)
    model.load_lora_adapter = functools.partial(_load_lora_adapter, model)


def uninstall_model_api(model: nn.Module) -> None:
    """Remove every instance override of MODEL_OVERRIDES: the class's own methods and plan apply again."""
    for name in MODEL_OVERRIDES:
        model.__dict__.pop(name, None)


def install_merged_api(model: nn.Module, attention: list[nn.Module], merged_processor: type) -> None:
    """Give the merged MMDiT `model` the instance-level answers above (idempotent). `attention`: its attention
    modules; `merged_processor`: the processor class they must keep (both from fusedit.model.merged_qkv, which calls
    this; passed in so that this module does not import it back)."""
    install_model_api(model)
    model._tp_plan = merged_tp_plan(type(model)._tp_plan)
    for attn in attention:
        setattr(attn, SET_PROCESSOR, functools.partial(_set_processor, attn, merged_processor))
        add_merged_parts(attn, QKV_GROUPS)


def uninstall_merged_api(model: nn.Module, attention: list[nn.Module]) -> None:
    """Remove what `install_merged_api` set: the class's own methods and plan apply again."""
    uninstall_model_api(model)
    for attn in attention:
        attn.__dict__.pop(SET_PROCESSOR, None)
        remove_merged_parts(attn)


__all__ = [
    "MergedPart",
    "add_merged_parts",
    "install_merged_api",
    "install_model_api",
    "merged_names_help",
    "merged_tp_plan",
    "remove_merged_parts",
    "standard_state_dict_hook",
    "translate_adapter_config",
    "translate_target_modules",
    "uninstall_merged_api",
    "uninstall_model_api",
]
