"""Prompt-length check for Qwen-Image-2.1 rows (fusedit.data.prompt_length.Qwen21PromptCounter): the budget is the
2.1 RoPE's frame table, read against diffusers' own QwenImage21Rope; the count is the text tokens diffusers' 2.1
prompt encoding gives."""

import logging

import pytest
import torch

from fusedit.data import EditDataModule
from fusedit.data.errors import DataValidationError
from fusedit.data.prompt_length import QWEN21_ROPE_POSITIONS, Qwen21PromptCounter, qwen21_text_positions_left
from tests.data_helpers import write_csv


def _frame_positions_used(text_tokens: int, references: list[tuple[int, int]], target: tuple[int, int]) -> None:
    """Run diffusers' QwenImage21Rope on a layout of `text_tokens` text tokens, then the references' and the target's
    latent grids (h, w), with its frame table cut to the 8,192 positive positions: an IndexError past them."""
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21Rope

    rope = QwenImage21Rope(theta=10000, axes_dim=[4, 6, 6])
    assert rope.freqs[0].shape[0] == QWEN21_ROPE_POSITIONS + 1024  # the table: positive positions, then negative
    rope.freqs[0] = rope.freqs[0][:QWEN21_ROPE_POSITIONS]
    blocks = [*references, target]
    mask = torch.cat(
        [torch.zeros(text_tokens, dtype=torch.bool)] + [torch.ones(h * w, dtype=torch.bool) for h, w in blocks]
    )
    rope([(1, h, w) for h, w in blocks], mask, device=torch.device("cpu"))


def test_the_qwen21_budget_is_the_last_text_length_diffusers_rope_takes():
    references, target = [(4, 6), (8, 2)], (30, 40)  # latent grids (h, w); sizes in pixels are 16x
    limit = qwen21_text_positions_left([(16 * w, 16 * h) for h, w in references])
    assert limit == QWEN21_ROPE_POSITIONS - 1 - 6 - 8
    _frame_positions_used(limit, references, target)
    with pytest.raises(IndexError):
        _frame_positions_used(limit + 1, references, target)


def test_qwen21_counter_counts_the_text_tokens_the_conditioner_encodes(tiny_qwen21_path):
    from fusedit.step.conditioning_qwen21 import Qwen21Conditioner

    conditioner = Qwen21Conditioner.from_pretrained(tiny_qwen21_path)
    counter = Qwen21PromptCounter(tiny_qwen21_path)
    references = [torch.zeros(1, 3, 64, 96), torch.zeros(1, 3, 32, 32)]
    for prompt, refs in (("make the square red", references), ("", references[:1]), ("a cat", [])):
        embeds, _, slots = conditioner.encode_prompts([prompt], refs)
        text = embeds.shape[1] - int(slots.sum())
        assert counter.count(prompt, [tuple(ref.shape[:1:-1]) for ref in refs]) == text


def _rows(tmp_path, prompts):
    from PIL import Image

    Image.new("RGB", (64, 64), "red").save(tmp_path / "t.png")
    Image.new("RGB", (64, 64), "blue").save(tmp_path / "e.png")
    return write_csv(tmp_path / "m.csv", [["t.png", "e.png", prompt] for prompt in prompts])


def test_a_qwen21_prompt_past_the_rope_is_refused_naming_row_and_count(tmp_path, tiny_qwen21_path):
    metadata = _rows(tmp_path, ["short", "x " * QWEN21_ROPE_POSITIONS])
    with pytest.raises(DataValidationError) as error:
        EditDataModule(metadata, model_path=tiny_qwen21_path).setup()
    message = str(error.value)
    assert "row 3, column 'prompt': prompt is " in message and "row 2" not in message
    assert "2.1 transformer's RoPE has 8187 frame positions left" in message  # 8191 - max(4, 4) of the 64x64 edit


def test_qwen21_long_prompt_truncate_fits_it_with_a_warning(tmp_path, tiny_qwen21_path, caplog):
    metadata = _rows(tmp_path, ["y " * QWEN21_ROPE_POSITIONS])
    module = EditDataModule(metadata, model_path=tiny_qwen21_path, long_prompt="truncate")
    with caplog.at_level(logging.WARNING, logger="fusedit.data"):
        module.setup()
    (sample,) = module.train_dataset.samples
    length = Qwen21PromptCounter(tiny_qwen21_path).count(sample.prompt, [(64, 64)])
    assert 8187 - 2 <= length <= 8187 and set(sample.prompt) <= {"y", " "}
    assert "row 2: prompt of" in caplog.text and "truncated to" in caplog.text


def test_qwen21_prompts_are_judged_for_rows_to_encode_and_rows_already_cached(tmp_path, tiny_qwen21_path, capsys):
    """`fusedit cache` refuses an overlong 2.1 prompt before loading; `truncate` caches it shortened (the embedding
    has the counted text tokens plus the reference's slots); once cached, `raise` still refuses the row."""
    from fusedit.cache import CachedEditDataModule
    from fusedit.cli import main

    metadata = _rows(tmp_path, ["y " * QWEN21_ROPE_POSITIONS])
    cache_dir = tmp_path / "cache"
    args = ["cache", f"model.path={tiny_qwen21_path}", f"data.metadata={metadata}", f"cache.dir={cache_dir}"]
    assert main([*args, f"paths.root_dir={tmp_path}"]) == 2
    assert "row 2, column 'prompt': prompt is " in capsys.readouterr().err
    assert not cache_dir.exists()  # refused before anything was encoded

    def module(**kwargs):
        return CachedEditDataModule(cache_dir=cache_dir, model_path=tiny_qwen21_path, metadata=metadata, **kwargs)

    truncated = module(long_prompt="truncate")
    truncated.setup()
    (row,) = truncated.train_dataset.rows
    cached = truncated.cache.read(row.key)
    text = cached["prompt"].shape[0] - int(cached["image_slots"].sum())
    assert text == Qwen21PromptCounter(tiny_qwen21_path).count(row.prompt, [(64, 64)]) <= 8187
    with pytest.raises(DataValidationError, match=r"row 2, column 'prompt': prompt is \d+ text tokens"):
        module().setup()
