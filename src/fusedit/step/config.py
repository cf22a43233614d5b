"""The typed `model` and `lora` configs: each `conf/model/*.yaml` and `conf/lora/*.yaml` names its class here with
`_target_`, `build_module` instantiates it (`hydra.utils.instantiate`), and the build stages read its fields. The
`precision` config is `fusedit.step.precision.Precision`.

Value checks that need the whole config (a LoRA target valid for the layout, paths that exist) stay in
fusedit.training.validate_config, which reports every problem at once; the checks here are those of one field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fusedit.step.precision import Precision

LAYOUTS = ("merged_qkv", "standard")


@dataclass
class ModelConfig:
    """conf/model/*.yaml: the transformer and how its training step runs.

    path: a diffusers pipeline folder (None: the tiny random pipeline). layout: `merged_qkv` (one q/k/v GEMM per
    stream) or `standard` (diffusers' separate projections). activation_checkpointing: recompute every k-th block
    in backward (0 = off, 1 = every block). checkpoint_offload: keep the checkpointed blocks' saved inputs in CPU
    memory until backward. resident_blocks: None keeps every block on the device; N streams the frozen weights of
    all blocks but the last N from host memory (fusedit.model.streaming; needs activation_checkpointing=1, not with
    compile). compile: regional torch.compile of the repeated block (True, or torch.compile kwargs).
    attention: SDPA backend preference (fusedit.model.attention.ATTENTION_BACKENDS).
    """

    path: str | None = None
    layout: str = "merged_qkv"
    activation_checkpointing: int = 0
    checkpoint_offload: bool = False
    resident_blocks: int | None = None
    compile: bool | dict = False
    attention: str = "auto"

    def __post_init__(self):
        from fusedit.model.attention import ATTENTION_BACKENDS

        if self.layout not in LAYOUTS:
            raise ValueError(f"model.layout must be one of {' | '.join(LAYOUTS)}, got {self.layout!r}")
        every = self.activation_checkpointing
        if not isinstance(every, int) or isinstance(every, bool) or every < 0:
            raise ValueError(f"model.activation_checkpointing must be an integer >= 0, got {every!r}")
        if self.checkpoint_offload and not every:
            raise ValueError("model.checkpoint_offload=true needs model.activation_checkpointing >= 1")
        resident = self.resident_blocks
        if resident is not None:
            if not isinstance(resident, int) or isinstance(resident, bool) or resident < 0:
                raise ValueError(f"model.resident_blocks must be null or an integer >= 0, got {resident!r}")
            if every != 1:
                raise ValueError(
                    "model.resident_blocks (streaming blocks from host memory) needs model.activation_checkpointing=1:"
                    " the backward pass must recompute each streamed block to copy it in again"
                )
            if self.compile:
                raise ValueError(
                    "model.resident_blocks (streaming blocks from host memory) cannot be used with model.compile"
                )
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"model.attention must be one of {' | '.join(ATTENTION_BACKENDS)}, got {self.attention!r}")


@dataclass
class LoraSpec:
    """conf/lora/*.yaml: the LoRA adapter trained on the transformer (PEFT's terms).

    targets: a named set (attn, attn_mlp, full: fusedit.lora.targets) or module names of either layout. rank: r.
    alpha: lora_alpha (None: alpha = rank); strength = alpha / rank (alpha / sqrt(rank) with use_rslora).
    dropout: lora_dropout. init: `default` (A kaiming, B zero), `gaussian`, or PEFT's `pissa` / `pissa_niter_<k>` /
    `olora` (which move the base weight's principal part into the adapter; fusedit.lora.adapter exports the
    difference). init_from: a LoRA file to start from (fusedit.lora.init_from: read and checked against rank and
    targets by the lora stage). type: `lora`, `dora` (PEFT's use_dora), `lokr` or `loha` (PEFT's LoKrConfig /
    LoHaConfig, fusedit.lora.lycoris). decompose_factor: LoKrConfig's (-1: w1's row count near sqrt(out_features)).
    """

    targets: str | list[str] = field(default="attn_mlp")
    rank: int = 32
    alpha: float | None = None
    dropout: float = 0.0
    init: str = "default"
    use_rslora: bool = False
    init_from: str | None = None
    type: str = "lora"
    decompose_factor: int = -1


def typed_configs(cfg) -> tuple[ModelConfig, LoraSpec, Precision]:
    """A composed train config's `model`, `lora` and `precision` as the classes their `_target_` names.

    Raises the class's own ValueError / TypeError for a bad value (not Hydra's wrapper around it), so that config
    validation can print it on one line.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    for key in ("model", "lora", "precision"):
        _refuse_unknown_keys(key, cfg[key])
    try:
        return tuple(instantiate(cfg[key], _convert_="all") for key in ("model", "lora", "precision"))
    except InstantiationException as error:
        if isinstance(error.__cause__, (ValueError, TypeError)):
            raise error.__cause__ from None
        raise


def _refuse_unknown_keys(group: str, node) -> None:
    """ValueError naming `group.key` for a key the group's class does not take (e.g. `+model.note=x`): the class's
    own error would be `__init__() got an unexpected keyword argument`, which names neither the group nor the fix."""
    import dataclasses

    from hydra.utils import get_class

    target = node.get("_target_") if hasattr(node, "get") else None
    if not target:
        return
    cls = get_class(target)
    if not dataclasses.is_dataclass(cls):
        return
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(str(k) for k in node.keys() if not str(k).startswith("_") and str(k) not in fields)
    if unknown:
        raise ValueError(f"{group}: unknown key(s) {unknown}; {cls.__name__} takes {fields}")
