"""The Qwen-Image model families and what each one takes, from a pipeline folder's JSON files alone.

A family is named from two small files: `model_index.json`'s pipeline `_class_name` and the transformer config's
`zero_cond_t` (only Edit-2511 sets it). Nothing here reads a weight or imports torch, so the data validator and
inference's preflight can judge every row against the chosen model before anything heavy loads.

The number of edit (input) images per family follows the diffusers pipelines: `QwenImagePipeline` takes none,
`QwenImageEditPipeline` one (its `image` is a single image), `QwenImageEditPlusPipeline` (2509, 2511) a list of
one or more. Qwen-Image-2.1 (`QwenImage21Pipeline`, `QwenImage21ModularPipeline` and its Turbo) is one model for
both: no reference image (text-to-image) or several (editing); its transformer config names its own class.
"""

from __future__ import annotations

from pathlib import Path

from fusedit.errors import UserInputError

TEXT_TO_IMAGE = "qwen-image"
EDIT = "qwen-image-edit"
EDIT_2509 = "qwen-image-edit-2509"
EDIT_2511 = "qwen-image-edit-2511"
QWEN_IMAGE_21 = "qwen-image-2.1"
QWEN21_PIPELINE_PREFIX = "QwenImage21"  # QwenImage21Pipeline, QwenImage21ModularPipeline, ...TurboModularPipeline

# family -> the diffusers pipeline class that runs it.
PIPELINE_CLASSES = {
    TEXT_TO_IMAGE: "QwenImagePipeline",
    EDIT: "QwenImageEditPipeline",
    EDIT_2509: "QwenImageEditPlusPipeline",
    EDIT_2511: "QwenImageEditPlusPipeline",
    QWEN_IMAGE_21: "QwenImage21Pipeline",
}

# family -> (fewest, most) edit images one prompt takes; None = no upper bound.
EDIT_IMAGE_COUNTS: dict[str, tuple[int, int | None]] = {
    TEXT_TO_IMAGE: (0, 0),
    EDIT: (1, 1),
    EDIT_2509: (1, None),
    EDIT_2511: (1, None),
    QWEN_IMAGE_21: (0, None),
}


def is_edit_family(family: str) -> bool:
    """Whether `family` edits: a prompt may come with edit (reference) images. Every family but Qwen-Image.

    Qwen-Image-2.1 edits and also draws from text alone, in one model, so this is True for it while
    `needs_edit_image` is False: ask that one where a prompt without an edit image is to be judged.
    """
    return EDIT_IMAGE_COUNTS[family][1] != 0


def needs_edit_image(family: str) -> bool:
    """Whether every prompt of `family` needs at least one edit image: the Qwen-Image-Edit models (their
    pipelines' `image` is required); not Qwen-Image (it takes none) nor Qwen-Image-2.1 (references optional)."""
    return EDIT_IMAGE_COUNTS[family][0] > 0


def pipeline_family(pipeline_class: str, zero_cond_t: bool) -> str:
    """The family of a pipeline class name (model_index.json `_class_name`). Raises UserInputError if not Qwen-Image."""
    if not pipeline_class.startswith("QwenImage"):
        raise UserInputError(f"pipeline class {pipeline_class!r} is not a Qwen-Image pipeline")
    if pipeline_class.startswith(QWEN21_PIPELINE_PREFIX):
        return QWEN_IMAGE_21
    if "EditPlus" in pipeline_class:
        return EDIT_2511 if zero_cond_t else EDIT_2509
    if "Edit" in pipeline_class:
        return EDIT
    return TEXT_TO_IMAGE


def folder_family(pipeline_dir: str | Path) -> str:
    """The family of the diffusers pipeline folder `pipeline_dir`, from its JSON files only.

    Raises ValueError (UserInputError, naming the file) when `model_index.json` is missing or not a JSON object,
    or names no Qwen-Image pipeline.
    """
    from fusedit.model.weight_files import read_json  # pure stdlib, like this module

    pipeline_dir = Path(pipeline_dir)
    index = read_json(pipeline_dir / "model_index.json")
    config_file = pipeline_dir / "transformer" / "config.json"
    config = read_json(config_file) if config_file.is_file() else {}
    return pipeline_family(str(index.get("_class_name", "")), bool(config.get("zero_cond_t", False)))


def edit_image_count_problem(count: int, family: str) -> str | None:
    """Why `count` edit images cannot go with one prompt of `family`, or None when they can."""
    fewest, most = EDIT_IMAGE_COUNTS[family]
    if fewest <= count and (most is None or count <= most):
        return None
    if most == 0:
        return "the model is Qwen-Image (text-to-image) and takes no input image"
    if count < fewest:
        return f"no edit image, but {family} takes {'one' if most == 1 else 'one or more'}"
    return f"{count} edit images, but {family} takes one; several images need Qwen-Image-Edit-2509 or -2511"
