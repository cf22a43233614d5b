"""Optimizers for the LoRA parameters (`optim=` in conf/optim), and the bytes of state each keeps per trainable
parameter (for the planner).

- `adamw`: `torch.optim.AdamW` (torch's foreach implementation on CUDA; not fused, which Lightning's gradient
  clipping refuses: `adamw`); two fp32 moments per parameter (8 bytes).
- `adamw8bit`: bitsandbytes' `AdamW8bit` (blockwise-quantised moments, Dettmers et al. 2022, "8-bit Optimizers via
  Block-wise Quantization"): two uint8 moments plus one fp32 absmax per block of 256 per moment, ~2.03 bytes per
  parameter. Tensors under `min_8bit_size` elements (bitsandbytes' default 4096) keep fp32 moments. bitsandbytes is
  an optional dependency (`pip install 'fusedit[lowmem]'`); its state is plain tensors, so Lightning checkpoints of
  it load with `weights_only=True`. It runs on CPU too (bitsandbytes >= 0.45 has CPU kernels for its optimizers).
- `prodigy`: prodigyopt's `Prodigy` (Mishchenko & Defazio 2023, "Prodigy: An Expeditiously Adaptive
  Parameter-Free Learner"): Adam whose step size d is estimated on the fly, so `optim.lr` is a multiplier (1.0).
  State per parameter: exp_avg, exp_avg_sq, s and the initial value p0 (16 bytes, with `slice_p=1`).
- `adafactor`: transformers' `Adafactor` (Shazeer & Stern 2018) with a fixed lr (`relative_step=False`) and no
  first moment (`beta1=None`): each [rows, cols] LoRA factor keeps one row and one column vector of second
  moments, (rows + cols) / (rows * cols) * 4 bytes per parameter: <= 1 byte for factors of rank >= 8.
- `schedulefree`: schedulefree's `AdamWScheduleFree` (Defazio et al. 2024, "The Road Less Scheduled"): no decay
  schedule; state z and exp_avg_sq (8 bytes). Its parameters are the training point y while training and the
  averaged point x for evaluation: `evaluation_mode` switches it around validation, export and validation images.

Every optimizer here keeps its state as plain tensors and numbers: Lightning checkpoints of it load with
`weights_only=True` and resume exactly (tests/test_optim.py).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
from collections.abc import Iterable, Iterator

import torch

from fusedit.errors import UserInputError

BITSANDBYTES_HINT = "optim=adamw8bit needs bitsandbytes: pip install 'fusedit[lowmem]' (or pip install bitsandbytes)"
_BLOCK = 256  # bitsandbytes' blockwise quantisation block for optimizer states

# Optimizer state bytes per trainable parameter, by `optim.name` (fp32 LoRA weights).
STATE_BYTES_PER_PARAMETER = {
    "adamw": 8.0,
    "adamw8bit": 2 * (1 + 4 / _BLOCK),
    "prodigy": 16.0,
    "adafactor": 1.0,
    "schedulefree": 8.0,
}
# The package each optimizer needs beyond torch, and how to get it (checked before the model loads).
PACKAGES = {
    "adamw8bit": ("bitsandbytes", BITSANDBYTES_HINT),
    "prodigy": (
        "prodigyopt",
        "optim=prodigy needs prodigyopt: pip install 'fusedit[optim]' (or pip install prodigyopt)",
    ),
    "schedulefree": (
        "schedulefree",
        "optim=schedulefree needs schedulefree: pip install 'fusedit[optim]' (or pip install schedulefree)",
    ),
}


def bitsandbytes_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def missing_package_hint(name: str) -> str | None:
    """The install hint when optimizer `name` needs a package that is not installed, else None."""
    if name == "adamw8bit":  # through bitsandbytes_available, which tests replace
        return None if bitsandbytes_available() else BITSANDBYTES_HINT
    package, hint = PACKAGES.get(name, (None, None))
    return hint if package is not None and importlib.util.find_spec(package) is None else None


def _plain(kwargs: dict) -> dict:
    # Hydra passes lists as ListConfig; optimizers keep them in param_groups, and a checkpoint holding one would not
    # load with weights_only=True.
    return {key: tuple(float(v) for v in value) if _is_list(value) else value for key, value in kwargs.items()}


def _is_list(value) -> bool:
    return isinstance(value, Iterable) and not isinstance(value, (str, bytes, torch.Tensor))


def adamw(params: Iterable[torch.nn.Parameter], **kwargs) -> torch.optim.AdamW:
    """torch.optim.AdamW over `params` with torch's default implementation (foreach on CUDA).

    Not fused: a fused AdamW unscales gradients inside its step (`_step_supports_amp_scaling`), and Lightning's
    mixed-precision plugin then refuses gradient clipping (`optim.grad_clip`, on by default) with a RuntimeError at
    the first step."""
    return torch.optim.AdamW(params, **_plain(kwargs))


def adamw_8bit(params: Iterable[torch.nn.Parameter], **kwargs) -> torch.optim.Optimizer:
    """bitsandbytes.optim.AdamW8bit over `params` (kwargs as torch.optim.AdamW's). Raises UserInputError when
    bitsandbytes is not installed."""
    try:
        from bitsandbytes.optim import AdamW8bit
    except ImportError as error:
        raise UserInputError(BITSANDBYTES_HINT) from error
    return AdamW8bit(params, **_plain(kwargs))


def prodigy(params: Iterable[torch.nn.Parameter], **kwargs) -> torch.optim.Optimizer:
    """prodigyopt.Prodigy over `params` (kwargs as Prodigy's: lr is a multiplier of the estimated step size)."""
    try:
        from prodigyopt import Prodigy
    except ImportError as error:
        raise UserInputError(PACKAGES["prodigy"][1]) from error
    # Prodigy's constructor print()s "Using decoupled weight decay" whenever weight_decay > 0 (prodigyopt 1.1): no
    # logger or flag turns it off, and decoupled decay is what optim=prodigy documents, so it tells nothing.
    with contextlib.redirect_stdout(io.StringIO()):
        return Prodigy(params, **_plain(kwargs))


def adafactor(params: Iterable[torch.nn.Parameter], **kwargs) -> torch.optim.Optimizer:
    """transformers.optimization.Adafactor over `params` with an explicit lr (kwargs as Adafactor's)."""
    from transformers.optimization import Adafactor

    return Adafactor(params, **_plain(kwargs))


def schedule_free_adamw(params: Iterable[torch.nn.Parameter], **kwargs) -> torch.optim.Optimizer:
    """schedulefree.AdamWScheduleFree over `params` (kwargs as its own). Left in eval mode, as schedulefree
    creates it: the training hooks switch it (`train_mode`)."""
    try:
        from schedulefree import AdamWScheduleFree
    except ImportError as error:
        raise UserInputError(PACKAGES["schedulefree"][1]) from error
    return AdamWScheduleFree(params, **_plain(kwargs))


def is_schedule_free(optimizer: torch.optim.Optimizer) -> bool:
    """True for schedulefree's optimizers: they hold y while training and x for evaluation (`train()`/`eval()`)."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # Lightning's LightningOptimizer wraps the real one
    return bool(optimizer.param_groups) and "train_mode" in optimizer.param_groups[0] and hasattr(optimizer, "eval")


def set_train_mode(optimizers: Iterable[torch.optim.Optimizer], training: bool) -> None:
    """Switch every schedule-free optimizer of `optimizers` to its training (y) or evaluation (x) parameters."""
    for optimizer in optimizers:
        if is_schedule_free(optimizer):
            optimizer.train() if training else optimizer.eval()


@contextlib.contextmanager
def evaluation_mode(optimizers: Iterable[torch.optim.Optimizer]) -> Iterator[None]:
    """The parameters a user of the model gets while inside (x for schedule-free optimizers in training mode; a
    no-op for others). On exit the training point y is restored from a copy, bit for bit, not recomputed from x (the
    lerp back would round): an export or a validation image must not change the run, and under DDP, where only
    rank 0 exports, must not move rank 0's weights away from the other ranks'."""
    switched = [getattr(o, "optimizer", o) for o in optimizers if is_schedule_free(o)]
    switched = [optimizer for optimizer in switched if optimizer.param_groups[0]["train_mode"]]
    saved = [[p.detach().clone() for group in o.param_groups for p in group["params"]] for o in switched]
    set_train_mode(switched, False)
    try:
        yield
    finally:
        with torch.no_grad():
            for optimizer, values in zip(switched, saved, strict=True):
                parameters = [p for group in optimizer.param_groups for p in group["params"]]
                for parameter, value in zip(parameters, values, strict=True):
                    parameter.copy_(value)
                for group in optimizer.param_groups:
                    group["train_mode"] = True
