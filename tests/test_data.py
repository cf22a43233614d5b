"""The data pipeline on good input: resizing rules, buckets, sampler determinism and resume, splits, the sample set."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from fusedit.data import BucketBatchSampler, EditDataModule, make_sample_dataset, split_train_val
from fusedit.data.dataset import collate
from fusedit.data.errors import MetadataError
from fusedit.data.images import calculate_dimensions, edit_size, resize_target, target_size, to_pil, to_tensor
from fusedit.data.records import Columns, read_records
from tests.data_helpers import save_image, simple_dataset, write_csv

# -- resize rules -------------------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    width=st.integers(1, 30000),
    height=st.integers(1, 30000),
    max_pixels=st.integers(256, 4 * 1024 * 1024),
)
def test_target_size_is_multiple_of_16_within_budget_and_never_upscaled(width, height, max_pixels):
    out_w, out_h = target_size(width, height, max_pixels)
    assert out_w % 16 == 0 and out_h % 16 == 0
    assert out_w * out_h <= max_pixels
    assert out_w <= max(width, 16) and out_h <= max(height, 16)
    scale = min(1.0, math.sqrt(max_pixels / (width * height)))
    if width * scale >= 160 and height * scale >= 160:
        assert abs(math.log((out_w / out_h) / (width / height))) < 0.11  # aspect kept up to rounding


@settings(max_examples=300, deadline=None)
@given(width=st.integers(1, 30000), height=st.integers(1, 30000), area=st.integers(32 * 32, 2048 * 2048))
def test_edit_size_is_multiple_of_32_near_the_area(width, height, area):
    out_w, out_h = edit_size(width, height, area)
    assert out_w % 32 == 0 and out_h % 32 == 0 and out_w >= 32 and out_h >= 32
    # diffusers rounds to nearest, so the area can overshoot by at most about one row/column of 32 per side.
    assert out_w * out_h <= area + 32 * (out_w + out_h) + 32 * 32


@pytest.mark.parametrize("ratio", [1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16, 2.5, 0.4, 1 / 3, 3.0])
def test_edit_size_matches_diffusers_qwen_image_edit(ratio):
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions as reference

    width, height, _ = reference(1024 * 1024, ratio)
    assert calculate_dimensions(1024 * 1024, ratio) == (width, height)


def test_resize_target_crops_instead_of_stretching():
    # Left third black, rest white; cropping a 3:1 image to 1:1 keeps the centre, which is all white.
    image = Image.new("RGB", (300, 100), (255, 255, 255))
    image.paste((0, 0, 0), (0, 0, 100, 100))
    out = resize_target(image, (64, 64))
    assert out.size == (64, 64)
    assert min(out.getpixel((x, 32))[0] for x in range(4, 60)) > 200


def test_tensor_round_trip_and_range():
    image = Image.new("RGB", (20, 10), (0, 128, 255))
    tensor = to_tensor(image)
    assert tensor.shape == (3, 10, 20) and tensor.dtype == torch.float32
    assert tensor[0].max() == -1.0 and tensor[2].min() == 1.0
    assert to_pil(tensor).getpixel((3, 3)) == (0, 128, 255)


# -- records ------------------------------------------------------------------------------------------------------


def test_jsonl_and_custom_columns_and_multi_edit(tmp_path):
    lines = [
        {"target": "a.png", "sources": ["b.png", "c.png"], "text": "merge them"},
        {"target": "d.png", "sources": "e.png|f.png", "text": "again"},
    ]
    path = tmp_path / "meta.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n", encoding="utf-8")
    records = read_records(path, Columns("target", "sources", "text"))
    assert [r.row for r in records] == [1, 2]
    assert records[0].edit_images == ("b.png", "c.png") and records[1].edit_images == ("e.png", "f.png")


def test_csv_rows_are_numbered_as_an_editor_shows_them(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text('image,edit_image,prompt\na.png,b.png,one\n\nc.png,d.png,"two\nlines"\ne.png,f.png,three\n')
    assert [(r.row, r.prompt) for r in read_records(path)] == [(2, "one"), (4, "two\nlines"), (6, "three")]


def test_an_optional_column_absent_from_the_file_is_none_and_a_present_one_keeps_the_rules(tmp_path):
    optional = Columns(optional={"image"})
    absent = tmp_path / "absent.csv"
    absent.write_text("edit_image,prompt\na.png,one\nb.png,two\n")
    assert [(r.row, r.image, r.edit_images) for r in read_records(absent, optional)] == [
        (2, None, ("a.png",)),
        (3, None, ("b.png",)),
    ]
    with pytest.raises(MetadataError, match=rf"{absent}: missing column\(s\) 'image'"):
        read_records(absent)  # required by default, as training needs it

    present = tmp_path / "present.csv"
    present.write_text("image,edit_image,prompt\nt.png,a.png,one\n,b.png,two\nu.png\n")
    records = read_records(present, optional)
    assert [r.image for r in records] == ["t.png", "", "u.png"]  # an empty cell stays "", not None
    assert records[2].problems == (("", "has 1 fields, the header has 3"),) and records[2].prompt == ""
    assert read_records(present, Columns(None, optional={"image"}))[0].image is None  # None: not read at all

    lines = [
        {"image": "t.png", "edit_image": "a.png", "prompt": "one"},
        {"edit_image": "b.png", "prompt": "two"},
        {"image": None, "edit_image": "c.png", "prompt": "three"},
        {"image": 7, "edit_image": "d.png", "prompt": "four"},
    ]
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text("\n".join(json.dumps(line) for line in lines))
    records = read_records(jsonl, optional)
    assert [r.image for r in records] == ["t.png", None, None, ""]
    assert [r.problems for r in records] == [(), (), (), (("image", "must be a string"),)]
    assert read_records(jsonl)[1].problems == (("image", "field missing on this line"),)
    with pytest.raises(ValueError, match="role names"):
        Columns(optional="image")
    with pytest.raises(ValueError, match="only an optional role"):
        Columns(image=None)


# -- buckets ------------------------------------------------------------------------------------------------------


def mixed_keys():
    return ["a"] * 7 + ["b"] * 5 + ["c"] * 3


def test_batches_come_from_one_bucket_and_cover_every_index():
    keys = mixed_keys()
    sampler = BucketBatchSampler(keys, 2, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 4 + 3 + 2
    assert all(len({keys[i] for i in batch}) == 1 for batch in batches)
    assert sorted(i for batch in batches for i in batch) == list(range(len(keys)))


def test_drop_last_and_repeat():
    keys = mixed_keys()
    sampler = BucketBatchSampler(keys, 2, drop_last=True, repeat=2)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 7 + 5 + 3
    assert all(len(batch) == 2 for batch in batches)


def test_sampler_is_deterministic_per_seed_and_epoch():
    keys = mixed_keys()
    first = BucketBatchSampler(keys, 2, seed=3)
    second = BucketBatchSampler(keys, 2, seed=3)
    epoch0, epoch1 = list(first), list(first)
    assert epoch0 == list(second) and epoch1 == list(second)
    assert epoch0 != epoch1  # iter() advances the epoch
    second.set_epoch(0)
    assert list(second) == epoch0
    assert list(BucketBatchSampler(keys, 2, seed=4)) != epoch0


@pytest.mark.parametrize("drop_last", [False, True])
def test_distributed_shards_are_equal_length_and_disjoint(drop_last):
    keys = mixed_keys()
    world = 3
    shards = [BucketBatchSampler(keys, 2, seed=0, rank=r, world_size=world, drop_last=drop_last) for r in range(world)]
    lists = [list(s) for s in shards]
    assert len({len(batches) for batches in lists}) == 1 and len(lists[0]) == len(shards[0])
    full = BucketBatchSampler(keys, 2, seed=0, drop_last=drop_last).epoch_batches(0)
    merged = [batch for group in zip(*lists) for batch in group]
    if drop_last:
        assert merged == full[: len(merged)]
    else:  # padded by reusing batches from the start, like DistributedSampler
        assert merged[: len(full)] == full and merged[len(full) :] == full[: len(merged) - len(full)]


def test_sampler_state_dict_resumes_mid_epoch():
    keys = mixed_keys()
    reference = BucketBatchSampler(keys, 2, seed=5)
    expected = list(reference) + list(reference)

    first = BucketBatchSampler(keys, 2, seed=5)
    list(first)
    iterator = iter(first)
    taken = [next(iterator) for _ in range(3)]
    state = first.state_dict()
    assert state == {"epoch": 1, "batches_consumed": 3, "seed": 5}

    resumed = BucketBatchSampler(keys, 2, seed=5)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert expected[len(expected) // 2 :] == taken + rest
    assert list(resumed) == BucketBatchSampler(keys, 2, seed=5).epoch_batches(2)  # then carries on normally


def test_sampler_state_at_epoch_end_moves_to_next_epoch():
    keys = mixed_keys()
    sampler = BucketBatchSampler(keys, 2, seed=0)
    sampler.load_state_dict({"epoch": 0, "batches_consumed": len(sampler)})
    assert list(sampler) == sampler.epoch_batches(1)


# -- data module --------------------------------------------------------------------------------------------------


def test_sample_dataset_builds_validates_and_is_deterministic(tmp_path):
    metadata = make_sample_dataset(tmp_path / "a")
    again = make_sample_dataset(tmp_path / "b")
    assert metadata.read_bytes() == again.read_bytes()
    for name in ("images/input_000.png", "images/target_005.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    module = EditDataModule(metadata, batch_size=4, max_pixels=64 * 64)
    module.setup("fit")
    assert len(module.train_dataset) == 12
    batch = next(iter(module.train_dataloader()))
    assert batch["image"].shape == (4, 3, 64, 64) and batch["edit_images"][0].shape == (4, 3, 64, 64)
    # The edit is visible: target and input differ, and only where a shape turned red.
    diff = (batch["image"] - batch["edit_images"][0]).abs().amax(dim=1)
    assert (diff > 0.1).float().mean() > 0.02
    red = batch["image"][:, 0] - batch["image"][:, 1]
    assert ((red > 1.0) == (diff > 0.1)).float().mean() > 0.95


def test_mixed_sizes_batch_through_buckets(tmp_path):
    rows = []
    for index, size in enumerate([(64, 48)] * 3 + [(48, 64)] * 3 + [(80, 80)] * 2):
        save_image(tmp_path / f"t{index}.png", size)
        save_image(tmp_path / f"e{index}.png", size)
        rows.append([f"t{index}.png", f"e{index}.png", "p"])
    metadata = write_csv(tmp_path / "m.csv", rows)
    module = EditDataModule(metadata, batch_size=3, max_pixels=64 * 64)
    module.setup()
    batches = list(module.train_dataloader())
    assert sorted(len(b["row"]) for b in batches) == [2, 3, 3]
    assert sorted(r for b in batches for r in b["row"]) == list(range(2, 10))
    shapes = {tuple(b["image"].shape[2:]) for b in batches}
    assert shapes == {(48, 64), (64, 48), (64, 64)}
    for batch in batches:
        height, width = batch["image"].shape[2:]
        assert batch["edit_images"][0].shape[2] % 32 == 0 and batch["edit_images"][0].shape[3] % 32 == 0
        assert height % 16 == 0 and width % 16 == 0


def test_collate_refuses_mixed_shapes():
    item = {"image": torch.zeros(3, 16, 16), "edit_images": [torch.zeros(3, 32, 32)], "prompt": "", "row": 2}
    other = dict(item, image=torch.zeros(3, 32, 16), row=3)
    with pytest.raises(ValueError, match=r"rows \[2, 3\]"):
        collate([item, other])


def test_edit_max_pixels_gives_qwen_edit_geometry(tmp_path):
    save_image(tmp_path / "t.png", (96, 64))
    save_image(tmp_path / "e.png", (96, 64))
    metadata = write_csv(tmp_path / "m.csv", [["t.png", "e.png", "p"]])
    module = EditDataModule(metadata, max_pixels=64 * 64, edit_max_pixels=1024 * 1024)
    module.setup()
    target, edits = module.train_dataset.sizes[0]
    assert target == (64, 48) and edits == (calculate_dimensions(1024 * 1024, 1.5),)


def test_validation_split_is_deterministic_and_disjoint(tmp_path):
    metadata = simple_dataset(tmp_path, n=10)
    modules = [EditDataModule(metadata, val_fraction=0.3, seed=7) for _ in range(2)]
    for module in modules:
        module.setup()
    val_rows = [[s.row for s in m.val_dataset.samples] for m in modules]
    train_rows = [s.row for s in modules[0].train_dataset.samples]
    assert val_rows[0] == val_rows[1] and len(val_rows[0]) == 3
    assert sorted(train_rows + val_rows[0]) == list(range(2, 12))
    other = EditDataModule(metadata, val_count=3, seed=8)
    other.setup()
    assert [s.row for s in other.val_dataset.samples] != val_rows[0]
    assert len(next(iter(other.val_dataloader()))["row"]) == 1
    no_val = EditDataModule(metadata)
    no_val.setup()
    assert no_val.val_dataloader() == []
    with pytest.raises(ValueError, match="no training data"):
        split_train_val(modules[0].train_dataset.samples, val_count=7)


def test_dataset_repeat_multiplies_the_epoch(tmp_path):
    metadata = simple_dataset(tmp_path, n=4)
    module = EditDataModule(metadata, batch_size=2, dataset_repeat=3)
    module.setup()
    rows = [r for batch in module.train_dataloader() for r in batch["row"]]
    assert sorted(rows) == sorted(list(range(2, 6)) * 3)


def test_worker_processes_give_the_same_batches(tmp_path):
    metadata = simple_dataset(tmp_path, n=6)
    batches = []
    for workers in (0, 2):
        module = EditDataModule(metadata, batch_size=2, num_workers=workers, seed=1)
        module.setup()
        batches.append(list(module.train_dataloader()))
    assert [b["row"] for b in batches[0]] == [b["row"] for b in batches[1]]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(*batches))


def test_config_errors_are_named(tmp_path):
    with pytest.raises(ValueError, match="data.on_error"):
        EditDataModule(tmp_path / "m.csv", on_error="ignore")
    with pytest.raises(ValueError, match="data.batch_size"):
        EditDataModule(tmp_path / "m.csv", batch_size=0)
    with pytest.raises(ValueError, match="data.val_fraction"):
        EditDataModule(tmp_path / "m.csv", val_fraction=1.0)


# -- resume through Lightning ---------------------------------------------------------------------------------------


def _fit_rows(metadata, max_steps, ckpt_dir=None, ckpt_path=None):
    import lightning.pytorch as pl

    class Recorder(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(()))
            self.rows = []

        def training_step(self, batch, batch_idx):
            self.rows.append(list(batch["row"]))
            return (self.weight - batch["image"].mean()) ** 2

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    callbacks = []
    if ckpt_dir is not None:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=3, save_top_k=-1))
    trainer = pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=bool(callbacks),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    model = Recorder()
    trainer.fit(model, datamodule=EditDataModule(metadata, batch_size=2, seed=11), ckpt_path=ckpt_path)
    return model.rows


def test_lightning_resume_continues_at_the_same_batch(tmp_path):
    metadata = simple_dataset(tmp_path / "data", n=10)  # 5 batches per epoch; resume mid-epoch at step 3
    full = _fit_rows(metadata, max_steps=8, ckpt_dir=tmp_path / "ckpt")
    checkpoint = torch.load(tmp_path / "ckpt" / "epoch=0-step=3.ckpt", weights_only=True)
    assert checkpoint["EditDataModule"] == {"epoch": 0, "batches_consumed": 3, "seed": 11}
    resumed = _fit_rows(metadata, max_steps=8, ckpt_path=tmp_path / "ckpt" / "epoch=0-step=3.ckpt")
    assert resumed == full[3:]
    assert sorted(r for batch in full[:5] for r in batch) == list(range(2, 12))
