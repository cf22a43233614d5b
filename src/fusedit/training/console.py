"""What a training run prints: each line once, nothing the user cannot act on.

Every filter here is a decision about someone else's output, with its reason. Warnings that point at a real
problem of the user's run are left alone; these are the ones fusedit has already decided about.
"""

from __future__ import annotations

import logging
import warnings

# Lightning's message in every `Trainer(...)` while the litlogger package is not installed: an advertisement.
_LIGHTNING_AD_PREFIX = "💡 Tip:"


class _DropLightningAd(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_LIGHTNING_AD_PREFIX)


def quiet_third_party_output() -> None:
    """Install the filters below (idempotent); call before the Trainer is built."""
    # `import lightning` gives the "lightning" logger its own console handler, and its records also propagate to
    # the root logger, where Hydra's job logging prints them (and writes train.log): every INFO line twice. Once
    # Hydra (or anyone) has configured the root logger, Lightning's extra handler is the duplicate.
    if logging.getLogger().handlers:
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            package_logger = logging.getLogger(name)
            if package_logger.propagate:  # otherwise its handler is the only one that prints it
                for handler in list(package_logger.handlers):
                    if type(handler) is logging.StreamHandler:
                        package_logger.removeHandler(handler)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        target = logging.getLogger(name)
        if not any(isinstance(f, _DropLightningAd) for f in target.filters):
            target.addFilter(_DropLightningAd())

    # Lightning's own use of a torch API torch deprecated (lightning/pytorch/utilities/_pytree.py); nothing in the
    # user's run or in fusedit can change it.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # fusedit resumes a run in its own directory on purpose (ckpt_path=<run dir>, auto_resume): its checkpoints/
    # holds the checkpoint being resumed from, and Lightning warns about that on every resume.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    # The frozen VAE / text encoder sit in eval mode by design.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    # A run without a validation split has no validation batches, which is what it asked for.
    warnings.filterwarnings("ignore", message=r"Total length of .* across ranks is zero")


def without_wandb_anonymous(logger) -> None:
    """Lightning's WandbLogger always passes `anonymous=None` to wandb.init, and wandb >= 0.19 warns on every run
    that "the anonymous setting has no effect". fusedit never sets it: drop the argument instead of the warning."""
    init = getattr(logger, "_wandb_init", None)
    if isinstance(init, dict) and init.get("anonymous") is None:
        init.pop("anonymous", None)
