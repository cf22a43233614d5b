"""callbacks=ema: the EMA of the LoRA weights is the expected average of the per-step weights, is exported beside
the raw LoRA through the same export, is what validation images see, and resumes exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fusedit.data import make_sample_dataset
from fusedit.lora.adapter import export_lora
from fusedit.training.callbacks import LoRAExport, ValidationImages
from fusedit.training.ema import LoRAEMA
from fusedit.training.train import _report, build_callbacks
from tests.test_optim import fit, lora_module, lora_state
from tests.training_utils import compose_train

DECAY = 0.5  # far from 1, so that three steps of averaging are far from the last weights


@pytest.fixture(scope="module")
def sample_metadata(tmp_path_factory) -> Path:
    return make_sample_dataset(tmp_path_factory.mktemp("data"), n=2, size=32)


@pytest.fixture(scope="module")
def conditioner(tiny_edit_path):
    from fusedit.step.conditioning import EditConditioner

    return EditConditioner.from_pretrained(tiny_edit_path)


@pytest.fixture(scope="module")
def batch(sample_metadata) -> dict:
    from fusedit.data import EditDataModule

    datamodule = EditDataModule(sample_metadata, batch_size=2, shuffle=False)
    datamodule.setup()
    return next(iter(datamodule.train_dataloader()))


def weights_per_step():
    from lightning.pytorch import Callback

    class Record(Callback):
        def __init__(self):
            self.steps: list[dict[str, torch.Tensor]] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.steps.append(lora_state(pl_module))

    return Record()


def test_ema_export_is_the_expected_average_of_the_step_weights(tmp_path, tiny_edit_path, conditioner, batch, capsys):
    module = lora_module(tiny_edit_path, conditioner, "adamw", ["optim.lr=1e-2"])
    record = weights_per_step()
    ema = LoRAEMA(decay=DECAY)
    export = LoRAExport(tmp_path / "lora")
    trainer = fit(module, batch, 3, callbacks=[ema, record, export])

    # torch.optim.swa_utils' EMA: the first update copies, then ema = decay * ema + (1 - decay) * w
    expected = record.steps[0]
    for weights in record.steps[1:]:
        expected = {name: DECAY * expected[name] + (1 - DECAY) * weights[name] for name in weights}
    for name, value in ema.averaged_parameters().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-6, atol=1e-8)

    # The file: the expected average through the same standard-layout export as the raw LoRA.
    trained = lora_state(module)
    assert all(torch.equal(trained[name], record.steps[-1][name]) for name in trained)  # raw weights kept
    module.load_state_dict(expected)
    export_lora(module.transformer, tmp_path / "expected.safetensors")
    raw, averaged = load_file(tmp_path / "lora/final.safetensors"), load_file(tmp_path / "lora/final-ema.safetensors")
    reference = load_file(tmp_path / "expected.safetensors")
    assert raw.keys() == averaged.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(averaged[key], reference[key], rtol=1e-6, atol=1e-8)
    assert max((raw[key] - averaged[key]).abs().max() for key in raw) > 1e-4

    # The end-of-run summary lists both files (it listed final.safetensors alone).
    written = [tmp_path / "lora/final.safetensors", tmp_path / "lora/final-ema.safetensors"]
    assert export.final_paths == written
    result = {"run_dir": tmp_path, "lora_path": written[0], "lora_files": written, "checkpoint": None, "metrics": {}}
    _report(result, trainer)
    summary = capsys.readouterr().out
    assert all(summary.count(str(path)) == 1 for path in written), summary


def test_validation_images_are_drawn_with_the_ema(tmp_path, tiny_edit_path, conditioner, batch, monkeypatch):
    module = lora_module(tiny_edit_path, conditioner, "adamw", ["optim.lr=1e-2"])
    ema = LoRAEMA(decay=DECAY)
    trainer = fit(module, batch, 2, callbacks=[ema])
    seen = {}
    images = ValidationImages(tmp_path / "samples", num_samples=1)
    monkeypatch.setattr(images, "generate", lambda trainer, pl_module: seen.update(lora_state(pl_module)) or [])
    raw = lora_state(module)
    images.log_images(trainer, module)
    for name, value in ema.averaged_parameters().items():
        assert torch.equal(seen[name], value)
    assert any(not torch.equal(seen[name], raw[name]) for name in raw)
    assert all(torch.equal(value, raw[name]) for name, value in lora_state(module).items())  # raw weights back


def test_ema_resumes_exactly(tmp_path, tiny_edit_path, conditioner, batch):
    uninterrupted = LoRAEMA(decay=DECAY)
    fit(lora_module(tiny_edit_path, conditioner, "adamw"), batch, 3, callbacks=[uninterrupted])

    first = LoRAEMA(decay=DECAY)
    fit(lora_module(tiny_edit_path, conditioner, "adamw"), batch, 2, callbacks=[first]).save_checkpoint(
        tmp_path / "step2.ckpt"
    )
    resumed = LoRAEMA(decay=DECAY)
    fit(
        lora_module(tiny_edit_path, conditioner, "adamw"),
        batch,
        3,
        ckpt_path=tmp_path / "step2.ckpt",
        callbacks=[resumed],
    )
    expected = uninterrupted.averaged_parameters()
    for name, value in resumed.averaged_parameters().items():
        assert torch.equal(value, expected[name]), name
    assert int(resumed.average.n_averaged) == 3


def test_callbacks_ema_composes_and_updates_before_the_other_callbacks(tmp_path):
    cfg = compose_train(["callbacks=ema", "callbacks.ema.decay=0.99", f"paths.output_dir={tmp_path}"])
    callbacks = build_callbacks(cfg)
    assert isinstance(callbacks[0], LoRAEMA) and callbacks[0].decay == 0.99
    assert any(isinstance(callback, LoRAExport) for callback in callbacks)  # the default callbacks stay
