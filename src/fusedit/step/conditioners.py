"""Which frozen-encoder class a pipeline folder trains with: one rule for live training (fusedit.training.train) and
the latent cache (fusedit.cache.data), which must encode exactly as training does."""

from __future__ import annotations

from pathlib import Path

from torch import nn


def conditioner_class(model_path: str | Path) -> type[nn.Module]:
    """The frozen encoders' class for the pipeline at `model_path`: Qwen21Conditioner for Qwen-Image-2.1 (Qwen3-VL,
    references in the text stream), EditConditioner for the MMDiT pipelines (fusedit.families.folder_family reads
    the folder's JSON files; nothing is loaded)."""
    from fusedit.families import QWEN_IMAGE_21, folder_family

    if folder_family(Path(model_path)) == QWEN_IMAGE_21:
        from fusedit.step.conditioning_qwen21 import Qwen21Conditioner

        return Qwen21Conditioner
    from fusedit.step.conditioning import EditConditioner

    return EditConditioner
