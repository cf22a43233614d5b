"""The latent / prompt-embedding cache: encoded once, never again unless a row's inputs or the encoder settings
change; training from it loads no encoder and gives the live loss; corrupt shards stop with the file's name."""

from __future__ import annotations

import csv
import functools
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fusedit.cache import CacheCorruptError, CachedConditioner, CachedEditDataModule, encoder_fingerprint, keys
from fusedit.cache.keys import fingerprint_hash
from fusedit.data import EditDataModule, make_sample_dataset
from fusedit.io import read_safetensors_header
from fusedit.step import conditioning
from fusedit.step.build import build_transformer
from fusedit.step.conditioning import EditConditioner
from fusedit.step.config import LoraSpec, ModelConfig
from fusedit.step.objective import FlowMatchObjective
from fusedit.step.precision import Precision
from fusedit.training.module import EditLoRAModule


class EncoderCalls:
    """Counts pipeline loads and the rows the VAE and text encoder see (patched into EditConditioner)."""

    def __init__(self, monkeypatch):
        self.loads, self.images, self.prompts = 0, 0, []
        original_init = EditConditioner.__init__
        original_image, original_prompts = EditConditioner.encode_image, EditConditioner.encode_prompts

        def init(conditioner, pipeline):
            self.loads += 1
            original_init(conditioner, pipeline)

        def encode_image(conditioner, images):
            self.images += images.shape[0]
            return original_image(conditioner, images)

        def encode_prompts(conditioner, prompts, edit_images):
            self.prompts += list(prompts)
            return original_prompts(conditioner, prompts, edit_images)

        monkeypatch.setattr(EditConditioner, "__init__", init)
        monkeypatch.setattr(EditConditioner, "encode_image", encode_image)
        monkeypatch.setattr(EditConditioner, "encode_prompts", encode_prompts)


def forbid_encoders(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the VAE / text encoder pipeline was loaded")

    monkeypatch.setattr(conditioning, "load_edit_pipeline", refuse)
    monkeypatch.setattr(EditConditioner, "__init__", refuse)


def rewrite_csv(metadata: Path, row_index: int, prompt: str) -> None:
    with open(metadata, newline="") as handle:
        rows = list(csv.DictReader(handle))
    rows[row_index]["prompt"] = prompt
    with open(metadata, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def csv_rows(metadata: Path) -> list[dict]:
    with open(metadata, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def data(tmp_path) -> Path:
    return make_sample_dataset(tmp_path / "data", n=4, size=32)


def datamodule(metadata, cache_dir, model_path, **kwargs) -> CachedEditDataModule:
    kwargs.setdefault("shuffle", False)
    return CachedEditDataModule(cache_dir=cache_dir, model_path=model_path, metadata=metadata, **kwargs)


def test_second_run_and_second_epoch_do_no_encoder_work(tmp_path, tiny_edit_path, data, monkeypatch):
    with monkeypatch.context() as patch:
        calls = EncoderCalls(patch)
        first = datamodule(data, tmp_path / "cache", tiny_edit_path, batch_size=2, build_batch_size=2)
        first.setup()
    assert (calls.loads, calls.images, len(calls.prompts)) == (1, 8, 4)  # 4 targets + 4 edit images, 4 prompts
    assert first.stats["encoded"] == 4 and first.stats["cached"] == 0

    forbid_encoders(monkeypatch)
    second = datamodule(data, tmp_path / "cache", tiny_edit_path, batch_size=2)
    second.setup()
    assert second.stats["encoded"] == 0 and second.stats["cached"] == 4
    loader_epochs = [[batch["row"] for batch in second.train_dataloader()] for _ in range(2)]
    assert sorted(sum(loader_epochs[0], [])) == sorted(sum(loader_epochs[1], [])) == [2, 3, 4, 5]
    batch = next(iter(second.train_dataloader()))
    inputs = CachedConditioner(tiny_edit_path)(batch)
    assert inputs.target.shape == (2, 4, 64) and inputs.condition.shape == (2, 4, 64)
    assert inputs.img_shapes == [[(1, 2, 2), (1, 2, 2)]] * 2


def test_a_changed_image_or_prompt_recomputes_exactly_that_row(tmp_path, tiny_edit_path, data, monkeypatch):
    datamodule(data, tmp_path / "cache", tiny_edit_path).setup()
    rows = csv_rows(data)
    image = data.parent / rows[1]["image"]
    Image.new("RGB", (32, 32), (10, 200, 30)).save(image)  # same name, new content
    rewrite_csv(data, 3, "make everything blue")
    with monkeypatch.context() as patch:
        calls = EncoderCalls(patch)
        again = datamodule(data, tmp_path / "cache", tiny_edit_path)
        again.setup()
    assert again.stats["encoded"] == 2 and again.stats["cached"] == 2
    assert sorted(calls.prompts) == sorted([rows[1]["prompt"], "make everything blue"])
    assert calls.images == 4

    rewrite_csv(data, 3, rows[3]["prompt"])  # back to the original prompt: still cached
    forbid_encoders(monkeypatch)
    back = datamodule(data, tmp_path / "cache", tiny_edit_path)
    back.setup()
    assert back.stats["encoded"] == 0


def test_an_encoder_setting_change_invalidates_everything(tmp_path, tiny_edit_path, data, monkeypatch):
    model = tmp_path / "model"
    shutil.copytree(tiny_edit_path, model)
    first = datamodule(data, tmp_path / "cache", model)
    first.setup()
    config = model / "text_encoder" / "generation_config.json"

    def edit_config():
        config.write_text(json.dumps({**json.loads(config.read_text()), "fusedit_test": 1}))
        return {}

    changes = {"dtype": lambda: {"dtype": "bfloat16"}, "max_pixels": lambda: {"max_pixels": 16 * 16}}
    changes["encoder_file"] = edit_config  # last: it changes the model for good
    directories = {first.cache.dir}
    for name, change in changes.items():
        with monkeypatch.context() as patch:
            calls = EncoderCalls(patch)
            second = datamodule(data, tmp_path / "cache", model, **change())
            second.setup()
        assert second.stats["encoded"] == 4 and len(calls.prompts) == 4, name
        directories.add(second.cache.dir)
        if name == "dtype":
            assert second.cache.read(second.train_dataset.rows[0].key)["prompt"].dtype == torch.bfloat16
    assert len(directories) == 4


def copy_with_new_mtimes(source: Path, destination: Path) -> Path:
    """What a re-download or a copy to another disk gives: the same bytes, every mtime different."""
    shutil.copytree(source, destination, copy_function=shutil.copyfile)
    for path in destination.rglob("*"):
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**12))
    return destination


def flip_byte(path: Path, offset: int) -> None:
    """Change one byte in place, keeping the file's size and mtime (the edit a stat-based check cannot see)."""
    stat = path.stat()
    with open(path, "r+b") as handle:
        handle.seek(offset)
        value = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([value ^ 0x01]))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size


def test_a_copied_model_keeps_its_fingerprint_and_finds_its_cache(tmp_path, tiny_edit_path, data, monkeypatch):
    first = datamodule(data, tmp_path / "cache", tiny_edit_path)
    first.setup()
    copy = copy_with_new_mtimes(tiny_edit_path, tmp_path / "copied" / "model")
    forbid_encoders(monkeypatch)
    second = datamodule(data, tmp_path / "cache", copy)
    second.setup()
    assert second.stats["encoded"] == 0 and second.cache.dir == first.cache.dir


def test_one_changed_weight_changes_the_fingerprint(tmp_path, tiny_edit_path):
    """Files up to FULL_HASH_BYTES (all of the tiny pipeline) are hashed whole: one weight changed in place, with
    the size and mtime kept, gives another fingerprint."""
    model = copy_with_new_mtimes(tiny_edit_path, tmp_path / "model")
    before = encoder_fingerprint(model, "float32", 1024, None)
    weights = model / "text_encoder" / "model.safetensors"
    header, _ = read_safetensors_header(weights)
    name, info = max(header.items(), key=lambda item: item[1]["data_offsets"][1] - item[1]["data_offsets"][0])
    start, end = info["data_offsets"]
    data_start = 8 + int.from_bytes(weights.read_bytes()[:8], "little")
    flip_byte(weights, data_start + (start + end) // 2)  # the middle of the largest tensor
    after = encoder_fingerprint(model, "float32", 1024, None)
    assert after["files"]["text_encoder"] != before["files"]["text_encoder"]
    assert fingerprint_hash(after) != fingerprint_hash(before)


def test_large_weight_files_are_identified_by_header_and_sampled_blocks(tmp_path, tiny_edit_path, monkeypatch):
    """Beyond FULL_HASH_BYTES the guarantee is exactly what the module docstring says: every byte that
    `sampled_ranges` names (each tensor's first and last SAMPLE_BYTES, the spread blocks) and the header count;
    a byte elsewhere, inside a large tensor, does not. Few reads, whatever the file size."""
    monkeypatch.setattr(keys, "FULL_HASH_BYTES", 0)
    weights = copy_with_new_mtimes(tiny_edit_path / "vae", tmp_path / "vae") / "diffusion_pytorch_model.safetensors"
    kind, ranges, header = keys.sampled_ranges(weights)
    assert kind == "safetensors" and len(ranges) < 200
    assert sum(end - start for start, end in ranges) < weights.stat().st_size // 2
    original, whole = keys.content_digest(weights), "sha256=" + keys.file_sha256(weights)
    assert original.startswith("safetensors-sampled-sha256=")

    tensors = json.loads(header)
    tensors.pop("__metadata__", None)
    data_start = 8 + len(header)
    largest = max(tensors.values(), key=lambda info: info["data_offsets"][1] - info["data_offsets"][0])
    first, last = data_start + largest["data_offsets"][0], data_start + largest["data_offsets"][1] - 1
    unsampled = next(offset for offset in range(first, last) if not any(start <= offset < end for start, end in ranges))
    flip_byte(weights, unsampled)
    assert keys.content_digest(weights) == original  # the documented limit
    monkeypatch.setattr(keys, "FULL_HASH_BYTES", 256 << 20)
    assert keys.content_digest(weights) != whole  # hashing the whole file (below FULL_HASH_BYTES) sees it
    monkeypatch.setattr(keys, "FULL_HASH_BYTES", 0)
    flip_byte(weights, unsampled)  # back to the original bytes
    for offset in (first, last, 8 + len(header) // 2):  # a tensor's first and last byte, the header
        flip_byte(weights, offset)
        assert keys.content_digest(weights) != original, offset
        flip_byte(weights, offset)
    assert keys.content_digest(weights) == original


def test_buckets_come_from_the_cached_latent_shapes(tmp_path, tiny_edit_path, monkeypatch):
    small = make_sample_dataset(tmp_path / "small", n=3, size=32)
    large = make_sample_dataset(tmp_path / "large", n=3, size=64, seed=1)
    metadata = tmp_path / "metadata.csv"
    rows = [{**r, "image": f"small/{r['image']}", "edit_image": f"small/{r['edit_image']}"} for r in csv_rows(small)]
    rows += [{**r, "image": f"large/{r['image']}", "edit_image": f"large/{r['edit_image']}"} for r in csv_rows(large)]
    with open(metadata, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    datamodule(metadata, tmp_path / "cache", tiny_edit_path, build_batch_size=3).setup()
    forbid_encoders(monkeypatch)
    cached = datamodule(metadata, tmp_path / "cache", tiny_edit_path, batch_size=3, shuffle=True)
    cached.setup()
    assert set(cached.train_dataset.sizes) == {((1, 2, 2), ((1, 2, 2),)), ((1, 4, 4), ((1, 4, 4),))}
    for batch in cached.train_dataloader():
        assert batch["target"].shape[0] == 3
        assert len({tuple(map(tuple, shapes)) for shapes in batch["img_shapes"]}) == 1


def test_training_from_the_cache_gives_the_live_loss(tmp_path, tiny_edit_path, data):
    live_data = EditDataModule(data, batch_size=2, shuffle=False)
    live_data.setup()
    cached_data = datamodule(data, tmp_path / "cache", tiny_edit_path, batch_size=2, build_batch_size=2)
    cached_data.setup()
    torch.manual_seed(0)
    transformer = build_transformer(tiny_edit_path, ModelConfig(), LoraSpec("attn", rank=4, alpha=8), Precision())
    with torch.no_grad():  # non-zero LoRA, as after some training
        for name, parameter in transformer.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    optimizer = functools.partial(torch.optim.AdamW, lr=1e-3)
    live = EditLoRAModule(transformer, EditConditioner.from_pretrained(tiny_edit_path), FlowMatchObjective(), optimizer)
    cached = EditLoRAModule(transformer, CachedConditioner(tiny_edit_path), FlowMatchObjective(), optimizer)
    assert not list(cached.conditioner.parameters())
    for live_batch, cached_batch in zip(live_data.train_dataloader(), cached_data.train_dataloader(), strict=True):
        assert live_batch["row"] == cached_batch["row"]
        live_loss = live.compute_loss(live.conditioner(live_batch), seed=7)[0]
        cached_loss = cached.compute_loss(cached.conditioner(cached_batch), seed=7)[0]
        assert cached_loss.item() == pytest.approx(live_loss.item(), rel=1e-5)


def test_train_from_the_cache_loads_no_encoder(tmp_path, tiny_edit_path, data, monkeypatch):
    from fusedit.training.train import train
    from tests.training_utils import train_cfg

    datamodule(data, tmp_path / "cache", tiny_edit_path).setup()
    forbid_encoders(monkeypatch)
    overrides = ["cache.enabled=true", f"cache.dir={tmp_path / 'cache'}", "trainer.max_epochs=2", "data.batch_size=2"]
    vae_loads = count_vae_loads(monkeypatch)
    result = train(train_cfg(tmp_path, tiny_edit_path, data, overrides))  # validation_images.num_samples=0
    assert result["metrics"]["train/loss"] > 0 and torch.isfinite(torch.tensor(result["metrics"]["train/loss"]))
    assert result["lora_path"].is_file()
    assert not (result["run_dir"] / "samples").exists() and vae_loads == []  # no round, no VAE


def count_vae_loads(monkeypatch) -> list:
    """Loads of the VAE (by the cached validation) are recorded; any VAE encode is an error."""
    from diffusers import AutoencoderKLQwenImage

    loads, original = [], AutoencoderKLQwenImage.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        loads.append(args)
        return original(cls, *args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("the VAE encoder was called")

    monkeypatch.setattr(AutoencoderKLQwenImage, "from_pretrained", classmethod(from_pretrained))
    monkeypatch.setattr(AutoencoderKLQwenImage, "encode", refuse)
    return loads


def test_validation_images_from_the_cache(tmp_path, tiny_edit_path, data, monkeypatch):
    """A cached run with validation images every 2 steps writes them, loads the VAE (decoder) once and never the
    text encoder, and its training steps make no encoder call."""
    from fusedit.training.callbacks import PROMPT_HEIGHT
    from fusedit.training.train import train
    from tests.training_utils import train_cfg

    datamodule(data, tmp_path / "cache", tiny_edit_path).setup()
    forbid_encoders(monkeypatch)
    vae_loads = count_vae_loads(monkeypatch)
    overrides = ["cache.enabled=true", f"cache.dir={tmp_path / 'cache'}", "trainer.max_steps=4", "data.batch_size=1"]
    overrides += ["data.val_count=1", "callbacks.validation_images.num_samples=1"]
    overrides += ["callbacks.validation_images.every_n_steps=2", "callbacks.validation_images.num_inference_steps=2"]
    result = train(train_cfg(tmp_path, tiny_edit_path, data, overrides))
    samples = result["run_dir"] / "samples"
    assert sorted(path.name for path in samples.iterdir()) == ["step-000002.png", "step-000004.png"]
    sheet = Image.open(samples / "step-000004.png")
    # input | output | target at the cached (training) size, under their labels, the prompt below
    assert sheet.size == (3 * 32, 14 + 32 + PROMPT_HEIGHT)
    assert len(vae_loads) == 1


def test_cached_validation_generates_what_the_pipeline_generates(tiny_edit_path, monkeypatch):
    """Sampling from cached encodings (denoise + the VAE decoder) gives the image QwenImageEditPipeline gives for
    the same embeddings, edit image, seed and steps, once the pipeline conditions at the cached size."""
    from diffusers import QwenImageEditPipeline
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit

    from fusedit.cache.validation import cached_inputs, denoise
    from fusedit.data.images import to_tensor

    pipeline = QwenImageEditPipeline.from_pretrained(tiny_edit_path)
    pipeline.set_progress_bar_config(disable=True)
    edit = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8))
    conditioner = EditConditioner(pipeline)
    condition, shape = conditioner.encode_image(to_tensor(edit)[None])
    embeds, _ = conditioner.encode_prompts(["make it blue"], [to_tensor(edit)[None]])
    sample = {"target": torch.zeros_like(condition[0]), "edits": [condition[0]], "prompt_embeds": embeds[0]}
    sample |= {"img_shapes": [shape, shape], "prompt": "make it blue", "row": 2}

    transformer = build_transformer(
        tiny_edit_path, ModelConfig(layout="standard"), LoraSpec("attn", rank=4, alpha=8), Precision()
    )
    optimizer = functools.partial(torch.optim.AdamW, lr=1e-3)
    cached = CachedConditioner(tiny_edit_path)
    module = EditLoRAModule(transformer, cached, FlowMatchObjective(), optimizer)  # LoRA B = 0: the base model
    scheduler = cached.sampler.scheduler_cls.from_config(cached.scheduler_config)
    ours = denoise(module, cached_inputs([sample], torch.device("cpu")), scheduler, num_inference_steps=3, seed=5)

    # The pipeline resizes the edit image to ~1024² before its VAE; at the cached size it must meet our inputs.
    monkeypatch.setattr(pipeline_qwenimage_edit, "calculate_dimensions", lambda area, ratio: (48, 32, None))
    call = {
        "image": edit,
        "prompt_embeds": embeds,
        "height": 32,
        "width": 48,
        "num_inference_steps": 3,
        "true_cfg_scale": 1.0,
    }
    reference = pipeline(**call, generator=torch.Generator().manual_seed(5), output_type="latent").images
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
    image = pipeline(**call, generator=torch.Generator().manual_seed(5)).images[0]
    decoded = cached.sampler.decode(ours, shape)[0]
    difference = np.abs(np.asarray(decoded, dtype=np.int16) - np.asarray(image, dtype=np.int16))
    assert decoded.size == image.size == (48, 32) and difference.max() <= 1


def test_missing_rows_without_build_are_an_error(tmp_path, tiny_edit_path, data):
    with pytest.raises(FileNotFoundError, match="4 of 4 rows .* are not in the cache"):
        datamodule(data, tmp_path / "cache", tiny_edit_path, build=False).setup()


def test_a_torn_or_corrupt_shard_names_the_file(tmp_path, tiny_edit_path, data):
    first = datamodule(data, tmp_path / "cache", tiny_edit_path)
    first.setup()
    shard = next(first.cache.dir.glob("shard-*.safetensors"))
    original = shard.read_bytes()

    shard.write_bytes(original[: len(original) // 2])  # torn
    with pytest.raises(CacheCorruptError, match=str(shard)):
        datamodule(data, tmp_path / "cache", tiny_edit_path).setup()

    flipped = bytearray(original)
    flipped[-3] ^= 0xFF  # same size, one byte of tensor data changed
    shard.write_bytes(bytes(flipped))
    bad = datamodule(data, tmp_path / "cache", tiny_edit_path, batch_size=4)
    bad.setup()
    with pytest.raises(CacheCorruptError, match=rf"{shard}.*sha256"):
        next(iter(bad.train_dataloader()))

    shard.unlink()  # the remedy the error names: its rows are encoded again
    again = datamodule(data, tmp_path / "cache", tiny_edit_path)
    again.setup()
    assert again.stats["encoded"] == 4


def test_cli_fills_the_cache_once(tmp_path, tiny_edit_path, data, capsys):
    from fusedit.cli import main

    args = ["cache", f"model.path={tiny_edit_path}", f"data.metadata={data}", f"cache.dir={tmp_path / 'cache'}"]
    args.append(f"paths.root_dir={tmp_path}")
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["encoded"] == 4
    assert main([*args, "--verify"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["encoded"] == 0 and stats["verified"] == 4


def test_bad_rows_are_skipped_or_reported_like_the_live_data_module(tmp_path, tiny_edit_path, data, monkeypatch):
    rows = csv_rows(data)
    (data.parent / rows[2]["edit_image"]).unlink()
    with pytest.raises(Exception, match=rf"row 4.*{rows[2]['edit_image']}.*file not found"):
        datamodule(data, tmp_path / "cache", tiny_edit_path).setup()
    first = datamodule(data, tmp_path / "cache", tiny_edit_path, on_error="skip")
    first.setup()
    assert first.stats["usable"] == 3 and first.stats["encoded"] == 3
    forbid_encoders(monkeypatch)
    second = datamodule(data, tmp_path / "cache", tiny_edit_path, on_error="skip")
    second.setup()
    assert second.stats["usable"] == 3 and second.stats["encoded"] == 0
    assert [row.row for row in second.train_dataset.rows] == [2, 3, 5]


def test_prompt_length_is_judged_for_rows_to_encode_and_rows_already_cached(
    tmp_path, tiny_edit_path, monkeypatch, caplog, capsys
):
    """A prompt over the text positions is refused before any encoder loads, by the data module and by `fusedit
    cache`; with data.long_prompt=truncate it is encoded shortened; once cached, `raise` still refuses it (its key
    is the row's own prompt) and `on_error=skip` skips it, with no encoder work."""
    from fusedit.cli import main
    from fusedit.data import DataValidationError
    from fusedit.data.prompt_length import PromptCounter, text_positions_left

    data = make_sample_dataset(tmp_path / "data", n=2, size=32)
    rewrite_csv(data, 1, "y" * 5000)  # row 3
    cache_dir = tmp_path / "cache"
    too_long = r"row 3, column 'prompt': prompt is \d+ text tokens"
    with monkeypatch.context() as patch:
        forbid_encoders(patch)
        with pytest.raises(DataValidationError, match=too_long):
            datamodule(data, cache_dir, tiny_edit_path).setup()
        args = ["cache", f"model.path={tiny_edit_path}", f"data.metadata={data}", f"cache.dir={cache_dir}"]
        assert main([*args, f"paths.root_dir={tmp_path}"]) == 2
        assert "row 3, column 'prompt'" in capsys.readouterr().err

    with caplog.at_level("WARNING", logger="fusedit.data"):
        first = datamodule(data, cache_dir, tiny_edit_path, long_prompt="truncate")
        first.setup()
    assert first.stats["encoded"] == 2 and "row 3: prompt of" in caplog.text
    (row,) = [row for row in first.train_dataset.rows if row.row == 3]
    target, edits = row.bucket
    sizes = [(w * 16, h * 16) for _, h, w in (target, *edits)]
    embedded = first.cache.read(row.key)["prompt"].shape[0]
    assert embedded == PromptCounter(tiny_edit_path).count(row.prompt, sizes[1:]) <= text_positions_left(sizes)
    assert row.prompt == "y" * len(row.prompt) and len(row.prompt) < 5000

    forbid_encoders(monkeypatch)
    with pytest.raises(DataValidationError, match=too_long):
        datamodule(data, cache_dir, tiny_edit_path).setup()
    skipped = datamodule(data, cache_dir, tiny_edit_path, on_error="skip")
    skipped.setup()
    assert [row.row for row in skipped.train_dataset.rows] == [2] and skipped.stats["encoded"] == 0
    again = datamodule(data, cache_dir, tiny_edit_path, long_prompt="truncate")
    again.setup()
    assert again.stats["encoded"] == 0 and 3 in [row.row for row in again.train_dataset.rows]
