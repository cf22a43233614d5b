"""The latent cache for Qwen-Image-2.1: rows hold the Qwen3-VL prompt encoding with its image slots, the reference
latents and the target latents; training from them gives the live loss; a changed input or encoder is re-encoded."""

from __future__ import annotations

import functools
import json
import shutil

import pytest
import torch
from PIL import Image

from fusedit.cache import CachedConditioner, CachedEditDataModule, LatentCache, encoder_fingerprint
from fusedit.data import EditDataModule
from fusedit.step.build import build_transformer
from fusedit.step.conditioning_qwen21 import Qwen21Conditioner
from fusedit.step.config import LoraSpec, ModelConfig
from fusedit.step.objective import FlowMatchObjective
from fusedit.step.precision import Precision
from fusedit.training.module import EditLoRAModule
from tests.data_helpers import write_csv


@pytest.fixture
def data(tmp_path):
    """Three rows: two references, one reference, none (text-to-image); one row masked."""
    folder = tmp_path / "data"
    folder.mkdir()
    colours = {"t1": "red", "t2": "green", "t3": "blue", "e1": "white", "e2": "black", "e3": "yellow"}
    for name, colour in colours.items():
        Image.new("RGB", (32, 32), colour).save(folder / f"{name}.png")  # the smallest 2.1 size: 2x2 tokens
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))
    mask.save(folder / "m1.png")
    rows = [
        {"image": "t1.png", "edit_image": "e1.png|e2.png", "prompt": "merge them", "mask": "m1.png"},
        {"image": "t2.png", "edit_image": "e3.png", "prompt": "make it green", "mask": ""},
        {"image": "t3.png", "edit_image": "", "prompt": "a blue square", "mask": ""},
    ]
    return write_csv(folder / "m.csv", [list(row.values()) for row in rows], header=list(rows[0]))


def cached(data, cache_dir, model, **kwargs) -> CachedEditDataModule:
    module = CachedEditDataModule(cache_dir=cache_dir, model_path=model, metadata=data, shuffle=False, **kwargs)
    module.setup()
    return module


def test_training_from_the_qwen21_cache_gives_the_live_loss(tmp_path, tiny_qwen21_path, data):
    live_data = EditDataModule(data, model_path=tiny_qwen21_path, shuffle=False, caption_dropout=0.5)
    live_data.setup()
    cached_data = cached(data, tmp_path / "cache", tiny_qwen21_path, caption_dropout=0.5)
    assert cached_data.stats["encoded"] == 3
    torch.manual_seed(0)
    spec = LoraSpec("attn_mlp", rank=4, alpha=8)
    transformer = build_transformer(tiny_qwen21_path, ModelConfig(), spec, Precision())
    with torch.no_grad():  # non-zero LoRA, as after some training
        for name, parameter in transformer.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    optimizer = functools.partial(torch.optim.AdamW, lr=1e-3)
    objective = FlowMatchObjective(mask_from_edit=False)
    live = EditLoRAModule(transformer, Qwen21Conditioner.from_pretrained(tiny_qwen21_path), objective, optimizer)
    from_cache = EditLoRAModule(transformer, CachedConditioner(tiny_qwen21_path), objective, optimizer)
    assert not list(from_cache.conditioner.parameters())
    batches = list(zip(live_data.train_dataloader(), cached_data.train_dataloader(), strict=True))
    assert len(batches) == 3
    for live_batch, cached_batch in batches:
        assert live_batch["row"] == cached_batch["row"]
        # The prompt, and (for the row with two references) caption dropout's empty prompt with its references.
        for drop in ([False], [True]) if live_batch["row"] == [2] else ([False],):
            live_inputs = live.conditioner(live_batch, drop_prompts=drop)
            cached_inputs = from_cache.conditioner(cached_batch, drop_prompts=drop)
            assert cached_inputs.img_shapes == live_inputs.img_shapes
            assert torch.equal(cached_inputs.image_slots, live_inputs.image_slots)
            live_loss = live.compute_loss(live_inputs, seed=7)[0]
            cached_loss = from_cache.compute_loss(cached_inputs, seed=7)[0]
            assert cached_loss.item() == pytest.approx(live_loss.item(), rel=1e-6)
    masked = next(cached for _, cached in batches if cached["row"] == [2])
    assert masked["token_weights"].tolist() == [[1.0, 0.0, 1.0, 0.0]] and masked["img_shapes"] == [[(1, 2, 2)] * 3]


def test_the_qwen21_cache_re_encodes_a_changed_row_or_encoder(tmp_path, tiny_qwen21_path, data, monkeypatch):
    model = tmp_path / "model"
    shutil.copytree(tiny_qwen21_path, model)
    first = cached(data, tmp_path / "cache", model)
    assert first.stats["encoded"] == 3
    Image.new("RGB", (32, 32), (10, 200, 30)).save(data.parent / "e3.png")  # same name, new content
    second = cached(data, tmp_path / "cache", model)
    assert (second.stats["encoded"], second.stats["cached"]) == (1, 2) and second.cache.dir == first.cache.dir
    # Another Qwen3-VL processor config (another prompt encoding) or size: another fingerprint, another directory.
    before = LatentCache(tmp_path / "cache", encoder_fingerprint(model, "float32", 1024 * 1024, None)).dir
    assert before == first.cache.dir
    assert LatentCache(tmp_path / "cache", encoder_fingerprint(model, "float32", 512 * 512, None)).dir != before
    config = model / "processor" / "processor_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "fusedit_test": 1}))
    assert LatentCache(tmp_path / "cache", encoder_fingerprint(model, "float32", 1024 * 1024, None)).dir != before


def test_config_checks_take_the_qwen21_cache_and_refuse_its_offload(tmp_path, tiny_qwen21_path, data):
    from fusedit.training.validate_config import ConfigError, validate_train_config
    from tests.training_utils import compose_train

    cfg = compose_train([f"model.path={tiny_qwen21_path}", f"data.metadata={data}", "logger=csv", "cache.enabled=true"])
    validate_train_config(cfg)  # was refused: "the latent cache does not hold Qwen-Image-2.1 encodings yet"
    cfg.cache.offload = True
    with pytest.raises(ConfigError, match=r"cache.offload=true streams the MMDiT text encoder's layers"):
        validate_train_config(cfg)
