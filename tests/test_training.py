"""Training on the tiny pipeline (CPU): every model variant and LoRA layout trains, merged == standard, the
trainable set is the LoRA, a single sample is overfitted, checkpoints hold only the LoRA and resume exactly."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fusedit.data import EditDataModule, make_sample_dataset
from fusedit.step.build import build_transformer
from fusedit.step.conditioning import EditConditioner
from fusedit.step.config import LoraSpec, ModelConfig
from fusedit.step.objective import FlowMatchObjective
from fusedit.step.precision import Precision
from fusedit.training.module import EditLoRAModule
from fusedit.training.train import train
from tests.training_utils import train_cfg, train_with_callbacks


@pytest.fixture(scope="module")
def sample_metadata(tmp_path_factory) -> Path:
    return make_sample_dataset(tmp_path_factory.mktemp("data"), n=4, size=32)


@pytest.fixture(scope="module")
def conditioner(tiny_edit_path) -> EditConditioner:
    return EditConditioner.from_pretrained(tiny_edit_path)


@pytest.fixture(scope="module")
def batch(sample_metadata) -> dict:
    datamodule = EditDataModule(sample_metadata, batch_size=2, shuffle=False)
    datamodule.setup()
    return next(iter(datamodule.train_dataloader()))


def make_module(path, conditioner, layout="merged_qkv", targets="attn_mlp", rank=4, alpha=8.0, lr=1e-3, seed=0):
    torch.manual_seed(seed)
    transformer = build_transformer(path, ModelConfig(layout=layout), LoraSpec(targets, rank, alpha), Precision())
    return EditLoRAModule(
        transformer, conditioner, FlowMatchObjective(), functools.partial(torch.optim.AdamW, lr=lr), seed=seed
    )


@pytest.mark.parametrize("lora", ["attn", "attn_mlp", "full"])
@pytest.mark.parametrize("model", ["merged_qkv", "standard"])
def test_fast_dev_run(tmp_path, tiny_edit_path, sample_metadata, model, lora):
    result = train(
        train_cfg(tmp_path, tiny_edit_path, sample_metadata, [f"model={model}", f"lora={lora}", "debug=fdr"])
    )
    assert result["metrics"]["train/loss"] > 0
    assert torch.isfinite(torch.tensor(result["metrics"]["train/loss"]))
    with safe_open(str(result["lora_path"]), "pt") as handle:
        keys = list(handle.keys())
    # Exported in diffusers' standard layout whatever the training layout.
    assert keys and all(key.startswith("transformer.") for key in keys)
    assert not any(".to_qkv." in key or ".default." in key for key in keys)
    if lora == "full":
        assert any(".img_mod.1." in key for key in keys)
    if lora == "attn":
        assert not any("mlp" in key or "to_out" in key for key in keys)


def test_merged_and_standard_give_the_same_loss(tiny_edit_path, conditioner, batch):
    from peft.utils import set_peft_model_state_dict

    from fusedit.convert import convert_lora_layout
    from fusedit.lora import lora_weights

    inputs = conditioner(batch)
    merged = make_module(tiny_edit_path, conditioner, "merged_qkv")
    standard = make_module(tiny_edit_path, conditioner, "standard")
    at_init = [module.compute_loss(inputs, seed=123)[0].item() for module in (merged, standard)]
    assert at_init[0] == pytest.approx(at_init[1], rel=1e-5)

    # Non-zero LoRAs (as after training), carried over to the standard layout by the exporter's exact split.
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in merged.trainable_parameters().values():
            parameter.normal_(0, 0.3)
    split = convert_lora_layout(lora_weights(merged.transformer), "to_standard")
    tensors = {f"{name}.lora_{role}.weight": getattr(m, role) for name, m in split.modules.items() for role in "AB"}
    result = set_peft_model_state_dict(standard.transformer, tensors)
    assert not result.unexpected_keys
    trained = [module.compute_loss(inputs, seed=123)[0].item() for module in (merged, standard)]
    assert trained[0] == pytest.approx(trained[1], rel=1e-5)
    assert trained[0] != pytest.approx(at_init[0], rel=1e-3)


def test_trainable_set_is_exactly_the_lora(tiny_edit_path, conditioner, batch):
    module = make_module(tiny_edit_path, conditioner)
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    lora = {name for name, _ in module.named_parameters() if ".lora_A." in name or ".lora_B." in name}
    assert trainable == lora and lora
    loss, _ = module.compute_loss(conditioner(batch), seed=0)
    loss.backward()
    for name, parameter in module.named_parameters():
        if name in lora:
            assert parameter.grad is not None, name
        else:
            assert parameter.grad is None, f"frozen {name} received a gradient"
    for part in (module.conditioner.vae, module.conditioner.text_encoder):
        assert not any(p.requires_grad for p in part.parameters())
    module.train()
    assert not module.conditioner.training and not module.conditioner.vae.training
    assert set(module.state_dict()) == {name for name in trainable}


def test_logged_grad_norm_is_the_norm_gradient_clipping_sees(tiny_edit_path, conditioner, batch, monkeypatch):
    module = make_module(tiny_edit_path, conditioner)
    module.compute_loss(conditioner(batch), seed=0)[0].backward()
    logged = {}
    monkeypatch.setattr(module, "log", lambda name, value, **kwargs: logged.__setitem__(name, value))
    parameters = list(module.trainable_parameters().values())
    module.on_before_optimizer_step(module.optimizer_factory(params=parameters))
    expected = torch.nn.utils.clip_grad_norm_(parameters, max_norm=float("inf"))
    assert expected > 0 and torch.allclose(logged["train/grad_norm"], expected, rtol=1e-6)


def test_lora_leaves_the_model_unchanged_at_init(tiny_edit_path, conditioner, batch):
    from fusedit.model import load_transformer

    inputs = conditioner(batch)
    module = make_module(tiny_edit_path, conditioner)
    base = load_transformer(tiny_edit_path, "merged_qkv")
    sigmas = torch.tensor([0.5, 0.7])
    noisy = torch.randn_like(inputs.target)
    with torch.no_grad():
        expected = base(
            hidden_states=torch.cat([noisy, inputs.condition], 1),
            timestep=sigmas,
            encoder_hidden_states=inputs.prompt_embeds,
            encoder_hidden_states_mask=inputs.prompt_mask,
            img_shapes=inputs.img_shapes,
            return_dict=False,
        )[0][:, : noisy.shape[1]]
        actual = module.predict_velocity(noisy, inputs, sigmas)
    torch.testing.assert_close(actual, expected)


def test_overfitting_one_sample_drives_the_loss_down(tiny_edit_path, conditioner, batch):
    # One sample, one fixed noise draw: memorisable. proj_out joins the targets because the tiny model's output
    # (64 channels from a 32-wide hidden state) spans only half the space unless the output projection adapts.
    one = {
        "image": batch["image"][:1],
        "edit_images": [e[:1] for e in batch["edit_images"]],
        "prompt": batch["prompt"][:1],
    }
    inputs = conditioner(one)
    module = make_module(tiny_edit_path, conditioner, targets=["attn", "proj_out"], rank=8, alpha=8)
    optimizer = torch.optim.AdamW(module.trainable_parameters().values(), lr=1e-2, weight_decay=0.0)
    with torch.no_grad():
        start = module.compute_loss(inputs, seed=0)[0].item()
    for _ in range(30):
        loss, _ = module.compute_loss(inputs, seed=0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        end = module.compute_loss(inputs, seed=0)[0].item()
    assert end < 0.2 * start, (start, end)


def test_module_load_state_dict_refuses_another_lora_naming_the_keys(tiny_edit_path, conditioner):
    from fusedit.training.checkpoint_checks import CheckpointError

    module = make_module(tiny_edit_path, conditioner)
    saved = {name: value + 1 for name, value in module.state_dict().items()}
    module.load_state_dict(saved)
    assert all(torch.equal(module.state_dict()[name], value) for name, value in saved.items())
    first = sorted(saved)[0]
    with pytest.raises(CheckpointError, match=rf"missing: {first.replace('.', '[.]')}"):
        module.load_state_dict({name: value for name, value in saved.items() if name != first})
    other = make_module(tiny_edit_path, conditioner, rank=2).state_dict()
    with pytest.raises(CheckpointError, match=r"(?s)wrong shape: .*file \[2, .*model \[4, .*lora\.rank"):
        module.load_state_dict(other)
    nan = dict(saved, **{first: torch.full_like(saved[first], float("nan"))})
    with pytest.raises(CheckpointError, match=rf"non-finite weights: {first.replace('.', '[.]')}"):
        module.load_state_dict(nan)
    # Non-strict: the tensors the file has are loaded (and checked), the others left as they are.
    module.load_state_dict({first: saved[first] * 2, "transformer.unknown": torch.zeros(1)}, strict=False)
    assert torch.equal(module.state_dict()[first], saved[first] * 2)


def test_checkpoint_holds_only_the_lora_and_loads_weights_only(tmp_path, tiny_edit_path, sample_metadata):
    result = train(
        train_cfg(
            tmp_path,
            tiny_edit_path,
            sample_metadata,
            ["trainer.max_steps=2", "callbacks.model_checkpoint.every_n_train_steps=1"],
        )
    )
    checkpoint = torch.load(result["checkpoint"], weights_only=True)
    keys = set(checkpoint["state_dict"])
    assert keys and all(".lora_A." in key or ".lora_B." in key for key in keys)
    assert checkpoint["global_step"] == 2
    assert checkpoint["optimizer_states"][0]["state"], "optimizer state must be saved"
    assert "EditDataModule" in checkpoint  # the data position
    lora_bytes = sum(v.numel() * v.element_size() for v in checkpoint["state_dict"].values())
    # LoRA + two Adam moments + small loop/callback state; never the frozen model.
    assert result["checkpoint"].stat().st_size < 4 * lora_bytes + 200_000


def _rows_callback():
    from lightning.pytorch import Callback

    class Rows(Callback):
        def __init__(self):
            self.rows: list[list[int]] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.rows.append(list(batch["row"]))

    return Rows()


def test_resume_continues_at_the_right_step_with_the_same_data_and_weights(tmp_path, tiny_edit_path, sample_metadata):
    common = ["data.batch_size=1", "callbacks.model_checkpoint.every_n_train_steps=3", "optim.lr=1e-3"]
    full_rows = _rows_callback()
    full = train_with_callbacks(
        train_cfg(tmp_path / "full", tiny_edit_path, sample_metadata, [*common, "trainer.max_steps=6"]), [full_rows]
    )

    first_rows = _rows_callback()
    first = train_with_callbacks(
        train_cfg(tmp_path / "split", tiny_edit_path, sample_metadata, [*common, "trainer.max_steps=3"]), [first_rows]
    )
    resumed_rows = _rows_callback()
    resumed = train_with_callbacks(
        train_cfg(
            tmp_path / "other",
            tiny_edit_path,
            sample_metadata,
            [*common, "trainer.max_steps=6", f"ckpt_path={first['run_dir']}"],
        ),
        [resumed_rows],
    )
    assert resumed["run_dir"] == first["run_dir"]  # continued in place
    assert torch.load(resumed["checkpoint"], weights_only=True)["global_step"] == 6
    assert len(resumed_rows.rows) == 3  # steps 4..6 only
    # 6 rows of a 4-sample dataset span two epochs: resume must keep the epoch and the position within it.
    assert first_rows.rows + resumed_rows.rows == full_rows.rows
    with safe_open(str(full["lora_path"]), "pt") as a, safe_open(str(resumed["lora_path"]), "pt") as b:
        for key in a.keys():
            torch.testing.assert_close(a.get_tensor(key), b.get_tensor(key), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("variant_fixture", ["tiny_edit_plus_path", "tiny_edit_2511_path"])
def test_several_edit_images_train_on_edit_plus_models(request, tmp_path, variant_fixture):
    from tests.data_helpers import save_image, write_csv

    model_path = request.getfixturevalue(variant_fixture)
    rows = []
    for index in range(2):
        save_image(tmp_path / f"target_{index}.png", (64, 64), (200, 20 * index, 20))
        save_image(tmp_path / f"a_{index}.png", (64, 64), (20, 200, 20 * index))
        save_image(tmp_path / f"b_{index}.png", (128, 64), (20, 20 * index, 200))
        rows.append([f"target_{index}.png", f"a_{index}.png|b_{index}.png", "put picture 2's colour on picture 1"])
    metadata = write_csv(tmp_path / "metadata.csv", rows)
    datamodule = EditDataModule(metadata, batch_size=2, shuffle=False)
    datamodule.setup()
    batch = next(iter(datamodule.train_dataloader()))
    conditioner = EditConditioner.from_pretrained(model_path)
    inputs = conditioner(batch)
    # Target first, then each edit image in order (RoPE frames 1..n), as QwenImageEditPlusPipeline builds them.
    target_shape, *edit_shapes = inputs.img_shapes[0]
    assert len(edit_shapes) == 2 and edit_shapes[0] != edit_shapes[1]
    assert inputs.condition.shape[1] == sum(h * w for _, h, w in edit_shapes)
    module = make_module(model_path, conditioner)
    loss, _ = module.compute_loss(inputs, seed=0)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in module.trainable_parameters().values())


def test_one_edit_image_model_refuses_several(tiny_edit_path, conditioner, batch):
    doubled = dict(batch, edit_images=[*batch["edit_images"], *batch["edit_images"]])
    with pytest.raises(ValueError, match="QwenImageEditPlusPipeline"):
        conditioner(doubled)


def test_validation_loss_and_images(tmp_path, tiny_edit_path, sample_metadata):
    result = train(
        train_cfg(
            tmp_path,
            tiny_edit_path,
            sample_metadata,
            [
                "trainer.max_steps=2",
                "data.val_count=1",
                "callbacks.validation_images.num_samples=1",
                "callbacks.validation_images.every_n_steps=2",
                "trainer.val_check_interval=1",
                "callbacks.validation_images.num_inference_steps=2",
                "callbacks.lora_export.every_n_steps=1",
            ],
        )
    )
    assert "val/loss" in result["metrics"]
    run = result["run_dir"]
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == ["step-000002.png"]
    assert sorted(p.name for p in (run / "lora").glob("*.safetensors")) == [
        "final.safetensors",
        "step-000001.safetensors",
        "step-000002.safetensors",
    ]
