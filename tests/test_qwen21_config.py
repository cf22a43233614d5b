"""Qwen-Image-2.1 judged before anything loads: which edit images its prompts take (fusedit.families: it edits
and draws from text alone) and its own LoRA target names in the training config check."""

import csv

import pytest

from fusedit.data.datamodule import EditDataModule
from fusedit.families import EDIT, EDIT_2509, EDIT_2511, QWEN_IMAGE_21, TEXT_TO_IMAGE, is_edit_family, needs_edit_image
from fusedit.training.validate_config import ConfigError, validate_train_config
from tests.test_text_to_image import t2i_metadata
from tests.training_utils import compose_train


def test_qwen21_edits_but_a_prompt_needs_no_edit_image():
    assert [is_edit_family(family) for family in (TEXT_TO_IMAGE, EDIT, EDIT_2509, EDIT_2511, QWEN_IMAGE_21)] == [
        False, True, True, True, True,
    ]  # fmt: skip
    assert [needs_edit_image(family) for family in (TEXT_TO_IMAGE, EDIT, EDIT_2509, EDIT_2511, QWEN_IMAGE_21)] == [
        False, True, True, True, False,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def metadata(tmp_path_factory):
    return t2i_metadata(tmp_path_factory.mktemp("qwen21-config"), n=2)


def test_a_qwen21_dataset_may_leave_out_the_edit_image_column(tmp_path, tiny_qwen21_path, metadata):
    with open(metadata, newline="") as handle:
        rows = [[row["image"], row["prompt"]] for row in csv.DictReader(handle)]
    two_columns = tmp_path / "t2i.csv"
    with open(two_columns, "w", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows([["image", "prompt"], *rows])
    datamodule = EditDataModule(two_columns, base_path=metadata.parent, model_path=tiny_qwen21_path)
    datamodule.setup()  # text-to-image rows, as for Qwen-Image
    assert len(datamodule.train_dataset) == len(rows) and datamodule.train_dataset[0]["edit_images"] == []


def _check(model_path, metadata, *overrides):
    validate_train_config(compose_train([f"model.path={model_path}", f"data.metadata={metadata}", *overrides]))


def test_a_qwen21_validation_sample_may_have_no_edit_image(tiny_qwen21_path, metadata):
    _check(tiny_qwen21_path, metadata, "logger=csv", "callbacks.validation_images.samples=[{prompt: a red square}]")


@pytest.mark.parametrize(
    "targets",
    ["[to_qkv,img_mlp.gate_up_proj]", "[to_q,to_k,to_v,img_mlp.gate_layer,img_mlp.proj]", "full", "[modulation.1]"],
)
def test_qwen21_lora_targets_pass_the_config_check(tiny_qwen21_path, metadata, targets):
    _check(tiny_qwen21_path, metadata, f"lora.targets={targets}")


@pytest.mark.parametrize(
    ("model", "targets", "refused"),
    [
        ("2.1", "[to_qkv,img_mlp.gate_up_prj]", "['img_mlp.gate_up_prj'] for Qwen-Image-2.1"),  # misspelt
        ("2.1", "[to_qkv,img_mod.1]", "['img_mod.1'] for Qwen-Image-2.1"),  # the MMDiT's per-block modulation
        ("2.1", "[add_qkv_proj]", "['add_qkv_proj'] for Qwen-Image-2.1"),  # the MMDiT's text stream
        ("mmdit", "[to_qkv,img_mlp.gate_up_proj]", "['img_mlp.gate_up_proj'] for Qwen-Image."),
    ],
)
def test_lora_targets_of_the_other_family_are_refused_in_one_line(
    tiny_qwen21_path, tiny_edit_path, metadata, model, targets, refused
):
    with pytest.raises(ConfigError) as error:
        _check(tiny_qwen21_path if model == "2.1" else tiny_edit_path, metadata, f"lora.targets={targets}")
    message = str(error.value)
    assert message.startswith("invalid training config: lora.targets: unknown LoRA target(s) ") and "\n" not in message
    assert refused in message


def test_without_file_checks_either_familys_names_pass(metadata):
    # `check_paths=False` reads no file, so the family is unknown: a name of either family passes, a typo does not.
    for targets in ("[img_mlp.gate_up_proj]", "[img_mod.1]"):
        validate_train_config(compose_train([f"lora.targets={targets}", "model.path=/x"]), check_paths=False)
    with pytest.raises(ConfigError, match=r"unknown LoRA target\(s\) \['img_mlp.gate_up_prj'\]"):
        validate_train_config(compose_train(["lora.targets=[img_mlp.gate_up_prj]", "model.path=/x"]), check_paths=False)


def test_lora_init_from_a_qwen21_lora_is_checked_and_built_with_the_21_names(tmp_path, tiny_qwen21_path, metadata):
    from fusedit.step.build import build_transformer
    from fusedit.step.config import LoraSpec, ModelConfig
    from fusedit.step.precision import Precision
    from tests.test_lora_init_from import kohya_file

    leaves = {"attn.to_q": 32, "attn.to_k": 32, "attn.to_v": 32, "img_mlp.gate_layer": 96, "img_mlp.proj": 96}
    modules = {f"transformer_blocks.0.{leaf}": (2, 4.0, out) for leaf, out in leaves.items()}
    path = kohya_file(tmp_path / "start.safetensors", modules)
    _check(tiny_qwen21_path, metadata, "lora.rank=2", f"lora.init_from={path}")  # lora.targets=attn_mlp (default)
    spec = LoraSpec(targets="attn_mlp", rank=2, alpha=2.0, init_from=str(path))
    model = build_transformer(tiny_qwen21_path, ModelConfig(layout="merged_qkv"), spec, Precision())
    block = model.transformer_blocks[0]
    # the file's groups, merged exactly: rank 2 + 2 on gate/up, 2 + 2 + 2 on q/k/v, its scale kept
    assert block.img_mlp.gate_up_proj.r["default"] == 4 and block.attn.to_qkv.r["default"] == 6
    assert block.img_mlp.gate_up_proj.scaling["default"] == pytest.approx(2.0)
