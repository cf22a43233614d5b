"""Text-to-image LoRA training for Qwen-Image (QwenImagePipeline) on the tiny T2I pipeline: rows of image + prompt,
the pipeline's own prompt encoding and no edit-image tokens, merged == standard, cache == live, validation images
from the prompt, an export that diffusers' QwenImagePipeline loads; and the TensorBoard logger's event file."""

from __future__ import annotations

import csv
import functools
from pathlib import Path

import pytest
import torch
from diffusers import QwenImagePipeline

from fusedit.cache import CachedConditioner, CachedEditDataModule
from fusedit.data import EditDataModule, make_sample_dataset
from fusedit.data.errors import DataValidationError
from fusedit.data.sample import T2I_METADATA
from fusedit.step.build import build_transformer
from fusedit.step.conditioning import EditConditioner
from fusedit.step.config import LoraSpec, ModelConfig
from fusedit.step.objective import FlowMatchObjective
from fusedit.step.precision import Precision
from fusedit.training.module import EditLoRAModule
from fusedit.training.train import train
from tests.training_utils import train_cfg


def t2i_metadata(root: Path, n: int = 4, edit_column: bool = False) -> Path:
    """The sample dataset's text-to-image rows (`metadata_t2i.csv`: image, empty edit_image, prompt), or with
    `edit_column` its targets and prompts with the edit rows' input images in the edit_image column."""
    source = make_sample_dataset(root, n=n, size=32)
    if not edit_column:
        return source.parent / T2I_METADATA
    with open(source, newline="") as handle:
        rows = list(csv.DictReader(handle))
    path = root / "t2i_with_edit.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["image", "prompt", "edit_image"])
        writer.writerows([row["image"], row["prompt"], row["edit_image"]] for row in rows)
    return path


@pytest.fixture(scope="module")
def metadata(tmp_path_factory) -> Path:
    return t2i_metadata(tmp_path_factory.mktemp("t2i-data"))


@pytest.fixture(scope="module")
def conditioner(tiny_t2i_path) -> EditConditioner:
    return EditConditioner.from_pretrained(tiny_t2i_path)


@pytest.fixture(scope="module")
def batch(metadata, tiny_t2i_path) -> dict:
    datamodule = EditDataModule(metadata, batch_size=2, shuffle=False, model_path=tiny_t2i_path)
    datamodule.setup()
    return next(iter(datamodule.train_dataloader()))


def make_module(path, conditioner, layout="merged_qkv"):
    torch.manual_seed(0)
    transformer = build_transformer(path, ModelConfig(layout=layout), LoraSpec("attn_mlp", 4, 8.0), Precision())
    return EditLoRAModule(transformer, conditioner, FlowMatchObjective(), functools.partial(torch.optim.AdamW, lr=1e-3))


def test_conditioning_is_the_text_to_image_pipelines(conditioner, batch):
    """No edit image and no edit tokens; the prompt embedding is QwenImagePipeline.encode_prompt's (its T2I
    template, no image); img_shapes hold the target only, as QwenImagePipeline.__call__ builds them."""
    assert batch["edit_images"] == []
    inputs = conditioner(batch)
    assert inputs.condition.shape == (2, 0, inputs.target.shape[2])
    height, width = batch["image"].shape[-2:]
    assert inputs.img_shapes == [[(1, height // 16, width // 16)]] * 2
    assert inputs.target.shape[1] == (height // 16) * (width // 16)
    pipeline = conditioner.pipeline
    for index, prompt in enumerate(batch["prompt"]):
        expected, _ = pipeline.encode_prompt(prompt=[prompt], device="cpu")
        length = expected.shape[1]
        assert torch.equal(inputs.prompt_embeds[index, :length], expected[0])
        assert not inputs.prompt_embeds[index, length:].any()


def test_merged_and_standard_step_give_the_same_loss_and_gradients(tiny_t2i_path, conditioner, batch):
    from peft.utils import set_peft_model_state_dict

    from fusedit.convert import convert_lora_layout
    from fusedit.lora import lora_weights

    inputs = conditioner(batch)
    merged = make_module(tiny_t2i_path, conditioner, "merged_qkv")
    standard = make_module(tiny_t2i_path, conditioner, "standard")
    torch.manual_seed(1)
    with torch.no_grad():  # non-zero LoRAs, as after training: gradients then reach lora_A as well
        for parameter in merged.trainable_parameters().values():
            parameter.normal_(0, 0.3)
    split = convert_lora_layout(lora_weights(merged.transformer), "to_standard")
    tensors = {f"{name}.lora_{role}.weight": getattr(m, role) for name, m in split.modules.items() for role in "AB"}
    assert not set_peft_model_state_dict(standard.transformer, tensors).unexpected_keys

    losses = []
    for module in (merged, standard):
        loss = module.compute_loss(inputs, seed=123, rows=batch["row"])[0]
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    # The exporter's split (fusedit.convert.lora_qkv): q/k/v share the merged A and take B's row thirds, so the
    # merged B's gradient is the three B gradients stacked and the merged A's is the sum of the three A gradients.
    merged_grads = {name: p.grad for name, p in merged.trainable_parameters().items()}
    standard_grads = {name: p.grad for name, p in standard.trainable_parameters().items()}
    for block in ("transformer.transformer_blocks.0.attn", "transformer.transformer_blocks.1.attn"):
        grads = {
            role: [standard_grads[f"{block}.to_{name}.lora_{role}.default.weight"] for name in "qkv"] for role in "AB"
        }
        torch.testing.assert_close(merged_grads[f"{block}.to_qkv.lora_B.default.weight"], torch.cat(grads["B"]))
        torch.testing.assert_close(merged_grads[f"{block}.to_qkv.lora_A.default.weight"], sum(grads["A"]))
        shared = f"{block}.to_out.0.lora_A.default.weight"
        torch.testing.assert_close(merged_grads[shared], standard_grads[shared])
    assert any(grad.abs().sum() > 0 for grad in merged_grads.values())


def test_training_from_the_cache_gives_the_live_loss(tmp_path, tiny_t2i_path, metadata, conditioner):
    live_data = EditDataModule(metadata, batch_size=2, shuffle=False, model_path=tiny_t2i_path)
    live_data.setup()
    cached_data = CachedEditDataModule(
        cache_dir=tmp_path / "cache", model_path=tiny_t2i_path, metadata=metadata, batch_size=2, shuffle=False
    )
    cached_data.setup()
    assert cached_data.stats["encoded"] == 4
    module = make_module(tiny_t2i_path, conditioner)
    with torch.no_grad():
        for name, parameter in module.transformer.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    cached = CachedConditioner(tiny_t2i_path)
    for live_batch, cached_batch in zip(live_data.train_dataloader(), cached_data.train_dataloader(), strict=True):
        assert live_batch["row"] == cached_batch["row"]
        live_loss = module.compute_loss(conditioner(live_batch), seed=7, rows=live_batch["row"])[0]
        cached_loss = module.compute_loss(cached(cached_batch), seed=7, rows=cached_batch["row"])[0]
        assert cached_loss.item() == pytest.approx(live_loss.item(), rel=1e-5)
    # Validation images from the cache: generated from the cached prompt alone, [output, target, prompt].
    (row,) = cached.validation_rows(module, [cached_data.train_dataset[0]], num_inference_steps=2, seed=0)
    assert [type(item).__name__ for item in row] == ["Image", "Image", "str"] and row[0].size == row[1].size


def test_an_edit_image_for_a_text_to_image_model_is_refused_by_row(tmp_path, tiny_t2i_path):
    """Decision: a filled edit_image cell is a bad row (named with its column), not silently dropped: the user
    may have pointed model.path at the wrong model. An edit_image column left empty is accepted."""
    metadata = t2i_metadata(tmp_path / "data", n=2, edit_column=True)
    with pytest.raises(DataValidationError) as raised:
        EditDataModule(metadata, model_path=tiny_t2i_path).setup()
    message = str(raised.value)
    assert "2 of 2 rows are bad" in message
    assert "row 2, column 'edit_image', path 'images/input_000.png'" in message
    assert "Qwen-Image (text-to-image) and takes no input image" in message

    with open(metadata, newline="") as handle:
        rows = list(csv.reader(handle))
    with open(metadata, "w", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows([rows[0], *[[*row[:2], ""] for row in rows[1:]]])
    datamodule = EditDataModule(metadata, model_path=tiny_t2i_path)
    datamodule.setup()
    assert len(datamodule.train_dataset) == 2 and datamodule.train_dataset[0]["edit_images"] == []


def test_an_edit_model_still_needs_the_edit_image_column(tmp_path, tiny_edit_path, tiny_t2i_path, metadata):
    from fusedit.data.errors import MetadataError

    with open(metadata, newline="") as handle:
        rows = [[row["image"], row["prompt"]] for row in csv.DictReader(handle)]
    two_columns = tmp_path / "t2i.csv"
    with open(two_columns, "w", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows([["image", "prompt"], *rows])
    with pytest.raises(MetadataError, match=r"missing column\(s\) 'edit_image'"):
        EditDataModule(two_columns, base_path=metadata.parent, model_path=tiny_edit_path).setup()
    with pytest.raises(DataValidationError, match=r"row 2, column 'edit_image': no edit image, but qwen-image-edit"):
        EditDataModule(metadata, model_path=tiny_edit_path).setup()  # empty edit_image cells
    two_columns_t2i = EditDataModule(two_columns, base_path=metadata.parent, model_path=tiny_t2i_path)
    two_columns_t2i.setup()  # a text-to-image model reads the file without the column
    assert len(two_columns_t2i.train_dataset) == len(rows)


@pytest.fixture(scope="module")
def t2i_run(tmp_path_factory, tiny_t2i_path, metadata) -> dict:
    """train.py's train(cfg) on the tiny Qwen-Image pipeline: 2 steps, one validation round from a held-out
    prompt, logged to TensorBoard."""
    tmp_path = tmp_path_factory.mktemp("t2i-run")
    overrides = [
        "logger=tensorboard",
        "trainer.max_steps=2",
        "data.val_count=1",
        "callbacks.validation_images.num_samples=1",
        "callbacks.validation_images.every_n_steps=2",
        "callbacks.validation_images.num_inference_steps=2",
    ]
    return train(train_cfg(tmp_path, tiny_t2i_path, metadata, overrides))


def test_text_to_image_trains_end_to_end(t2i_run, tiny_t2i_path):
    from PIL import Image

    from fusedit.training.callbacks import PROMPT_HEIGHT

    assert torch.isfinite(torch.tensor(t2i_run["metrics"]["train/loss"]))
    sheet = Image.open(t2i_run["run_dir"] / "samples" / "step-000002.png")
    # output | target (no input panel: the image is generated from the prompt), the prompt below.
    assert sheet.size == (2 * 32, 14 + 32 + PROMPT_HEIGHT)


def test_exported_lora_loads_in_diffusers_qwen_image_pipeline_and_changes_its_output(t2i_run, tiny_t2i_path):
    pipe = QwenImagePipeline.from_pretrained(tiny_t2i_path)
    pipe.set_progress_bar_config(disable=True)

    def generate():
        generator = torch.Generator().manual_seed(0)
        return pipe(prompt="make the square red", height=32, width=32, num_inference_steps=2, generator=generator,
                    output_type="pt").images  # fmt: skip

    base = generate()
    # A LoRA after 2 steps is small: scale it up so that the change is far above float noise.
    pipe.load_lora_weights(str(t2i_run["lora_path"]), adapter_name="t2i")
    loaded = {name for name, _ in pipe.transformer.named_parameters() if "lora_" in name}
    assert any("to_q.lora_A" in name for name in loaded) and any("add_k_proj.lora_B" in name for name in loaded)
    pipe.set_adapters(["t2i"], [1000.0])
    assert not torch.allclose(generate(), base, atol=1e-4)


def test_tensorboard_logs_the_scalars_and_the_validation_images(t2i_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted((t2i_run["run_dir"] / "tensorboard").glob("version_*/events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    accumulator = EventAccumulator(str(events[0].parent), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    scalars = set(accumulator.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/samples_per_s", "train/tokens_per_s"} <= scalars
    loss = accumulator.Scalars("train/loss")
    assert [event.step for event in loss] == [0, 1] and all(event.value > 0 for event in loss)
    images = set(accumulator.Tags()["images"])
    assert {"val/samples", "val/output/0", "val/target/0"} <= images and "val/input/0" not in images
    (grid,) = accumulator.Images("val/samples")
    assert grid.step == 2 and (grid.width, grid.height) == (2 * 32, 14 + 32 + 14)


def test_validation_samples_of_a_text_to_image_model_have_no_edit_image(tiny_t2i_path, tiny_edit_path, metadata):
    from fusedit.training.validate_config import ConfigError, validate_train_config
    from tests.training_utils import compose_train

    def check(model_path, sample: str) -> None:
        overrides = [f"model.path={model_path}", f"data.metadata={metadata}", "logger=csv"]
        validate_train_config(compose_train([*overrides, f"callbacks.validation_images.samples=[{sample}]"]))

    check(tiny_t2i_path, "{prompt: a red square}")  # accepted
    with pytest.raises(ConfigError, match=r"samples\[0\].edit_image: model.path is Qwen-Image \(text-to-image\)"):
        check(tiny_t2i_path, f"{{edit_image: {metadata}, prompt: x}}")
    with pytest.raises(ConfigError, match=r"samples\[0\].edit_image must be an image path"):
        check(tiny_edit_path, "{prompt: a red square}")


def test_the_demo_data_of_a_text_to_image_model_is_its_text_to_image_rows(tmp_path, tiny_t2i_path, tiny_edit_path):
    from fusedit.data.sample import fill_demo_paths
    from tests.training_utils import compose_train

    for model_path, expected in ((tiny_t2i_path, T2I_METADATA), (tiny_edit_path, "metadata.csv")):
        cfg = compose_train([f"paths.cache_dir={tmp_path}", f"model.path={model_path}"])
        fill_demo_paths(cfg)
        assert Path(cfg.data.metadata).name == expected
        datamodule = EditDataModule(cfg.data.metadata, model_path=model_path)
        datamodule.setup()  # every row valid for its model
        assert len(datamodule.train_dataset) == 12


def test_a_prompt_longer_than_the_text_to_image_pipeline_keeps_is_refused_or_truncated(tmp_path, tiny_t2i_path):
    """QwenImagePipeline's tokenizer call keeps 1,024 prompt tokens and drops the rest without a word."""
    source = t2i_metadata(tmp_path / "data", n=2)
    with open(source, newline="") as handle:
        rows = list(csv.reader(handle))
    rows[2][2] = "x" * 1500  # 1,505 tokens with the tiny byte-level tokenizer (template suffix included)
    with open(source, "w", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows(rows)
    with pytest.raises(DataValidationError, match=r"row 3, column 'prompt': prompt is 1505 text tokens .* keeps 1024"):
        EditDataModule(source, model_path=tiny_t2i_path).setup()
    truncated = EditDataModule(source, model_path=tiny_t2i_path, long_prompt="truncate")
    truncated.setup()
    prompts = [sample.prompt for sample in truncated.train_dataset.samples]
    assert prompts[0] == "a red square beside a circle" and len(prompts[1]) == 1024 - 5 and set(prompts[1]) == {"x"}


def test_a_qwen_image_21_pipeline_passes_the_config_check(tiny_qwen21_path, metadata):
    from fusedit.training.validate_config import validate_train_config
    from tests.training_utils import compose_train

    # 2.1 trains (tests/test_qwen21_train.py); its rows may carry references or none.
    validate_train_config(compose_train([f"model.path={tiny_qwen21_path}", f"data.metadata={metadata}", "logger=csv"]))
