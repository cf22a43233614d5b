"""Caption dropout (data.caption_dropout=p): a sample trains on the empty prompt, encoded through the same template,
at rate p, drawn per (seed, step, row); the cache stores the empty-prompt encoding once and uses it."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from fusedit.cache import CachedConditioner, CachedEditDataModule
from fusedit.data import EditDataModule, make_sample_dataset
from fusedit.step.build import build_transformer
from fusedit.step.conditioning import EditConditioner
from fusedit.step.config import LoraSpec, ModelConfig
from fusedit.step.loss import dropped_captions
from fusedit.step.objective import FlowMatchObjective
from fusedit.step.precision import Precision
from fusedit.training.module import EditLoRAModule


@pytest.mark.parametrize("probability", [0.1, 0.5])
def test_the_dropout_rate_is_p_within_a_binomial_bound_and_reproducible(probability):
    rows, steps = range(2, 202), range(100)  # 20,000 draws
    draws = [dropped_captions(step * 7919, rows, probability) for step in steps]
    count, total = sum(map(sum, draws)), len(rows) * len(steps)
    bound = 5 * math.sqrt(total * probability * (1 - probability))  # 5 standard deviations
    assert abs(count - total * probability) < bound
    assert draws[3] == dropped_captions(3 * 7919, rows, probability)  # the same (seed, step, row): the same draw
    assert draws[3] != draws[4]  # another step: other rows dropped
    # A sample's draw does not depend on the batch it lands in (2 ranks x batch 1 = 1 rank x batch 2).
    assert dropped_captions(11, [5, 9], probability) == dropped_captions(11, [5], probability) + dropped_captions(
        11, [9], probability
    )
    assert dropped_captions(11, rows, 0.0) == [False] * len(rows)
    assert all(dropped_captions(11, rows, 1.0))


class PromptRecorder(EditConditioner):
    """The real conditioner, recording the prompts it encodes."""

    def encode_prompts(self, prompts, edit_images):
        self.seen = getattr(self, "seen", []) + list(prompts)
        return super().encode_prompts(prompts, edit_images)


def module_for(conditioner, tiny_edit_path, caption_dropout):
    torch.manual_seed(0)
    transformer = build_transformer(tiny_edit_path, ModelConfig(), LoraSpec("attn", rank=4, alpha=8), Precision())
    optimizer = functools.partial(torch.optim.AdamW, lr=1e-3)
    return EditLoRAModule(
        transformer, conditioner, FlowMatchObjective(), optimizer, seed=3, caption_dropout=caption_dropout
    )


def test_the_training_step_encodes_the_dropped_rows_prompts_as_empty(tmp_path, tiny_edit_path, monkeypatch):
    data = EditDataModule(make_sample_dataset(tmp_path, n=4, size=32), batch_size=4, shuffle=False)
    data.setup()
    batch = next(iter(data.train_dataloader()))
    module = module_for(PromptRecorder.from_pretrained(tiny_edit_path), tiny_edit_path, caption_dropout=0.5)
    encoded = []
    original = module.compute_loss

    def compute_loss(inputs, seed, rows=None):
        encoded.append(inputs)
        return original(inputs, seed, rows)

    monkeypatch.setattr(module, "compute_loss", compute_loss)
    monkeypatch.setattr(module, "log", lambda *args, **kwargs: None)
    for seed in range(100):  # a seed whose step-0 draw drops some rows and keeps others
        module.seed = seed
        drop = dropped_captions(module._step_seed(), batch["row"], 0.5)
        if 0 < sum(drop) < 4:
            break
    module.training_step(batch, 0)
    assert module.conditioner.seen == ["" if d else p for p, d in zip(batch["prompt"], drop)]
    # The empty prompt goes through the same template with the row's edit image: what the pipeline encodes for "".
    conditioner = module.conditioner
    row = drop.index(True)
    empty, _ = conditioner.encode_prompts([""], [slot[row : row + 1] for slot in batch["edit_images"]])
    inputs = encoded[0]
    length = empty.shape[1]
    torch.testing.assert_close(inputs.prompt_embeds[row, :length], empty[0])
    assert inputs.prompt_mask is None or int(inputs.prompt_mask[row].sum()) == length


def test_the_cache_stores_the_empty_prompt_once_and_training_uses_it(tmp_path, tiny_edit_path):
    metadata = make_sample_dataset(tmp_path / "data", n=4, size=32)

    def cached_data():
        data = CachedEditDataModule(cache_dir=tmp_path / "cache", model_path=tiny_edit_path, metadata=metadata,
                                    batch_size=4, shuffle=False, caption_dropout=0.5)  # fmt: skip
        data.setup()
        return data

    without = CachedEditDataModule(cache_dir=tmp_path / "cache", model_path=tiny_edit_path, metadata=metadata)
    without.setup()  # a cache made without dropout: its rows lack the empty prompt and are encoded again, once
    first = cached_data()
    assert first.stats["encoded"] == 4
    assert cached_data().stats["encoded"] == 0

    live_data = EditDataModule(metadata, batch_size=4, shuffle=False)
    live_data.setup()
    live = module_for(EditConditioner.from_pretrained(tiny_edit_path), tiny_edit_path, 0.5)
    cached = module_for(CachedConditioner(tiny_edit_path), tiny_edit_path, 0.5)
    cached.transformer = live.transformer
    live_batch, cached_batch = next(iter(live_data.train_dataloader())), next(iter(first.train_dataloader()))
    drop = [True, False, True, True]
    live_inputs = live.conditioner(live_batch, drop_prompts=drop)
    cached_inputs = cached.conditioner(cached_batch, drop_prompts=drop)
    torch.testing.assert_close(cached_inputs.prompt_embeds, live_inputs.prompt_embeds, rtol=1e-5, atol=1e-6)
    assert (cached_inputs.prompt_mask is None) == (live_inputs.prompt_mask is None)
    live_loss = live.compute_loss(live_inputs, seed=5, rows=live_batch["row"])[0]
    cached_loss = cached.compute_loss(cached_inputs, seed=5, rows=cached_batch["row"])[0]
    assert cached_loss.item() == pytest.approx(live_loss.item(), rel=1e-5)


def test_caption_dropout_out_of_range_is_refused():
    with pytest.raises(ValueError, match=r"data.caption_dropout must be in \[0, 1\], got 1.5"):
        EditDataModule("x.csv", caption_dropout=1.5)
