"""Faults, bad configs, bad checkpoints and LoRAs, output paths: each case has a clear, tested outcome.

Signals (subprocess SIGTERM + resume) and DDP are in test_reliability_processes.py.
"""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fusedit.data import make_sample_dataset
from fusedit.errors import UserInputError
from fusedit.training.checkpoint_checks import CheckpointError
from fusedit.training.faults import NonFiniteTrainingError
from fusedit.training.module import EditLoRAModule
from fusedit.training.train import train
from fusedit.training.validate_config import ConfigError, validate_train_config
from tests.reliability_helpers import PoisonGradients, SendSignal, lora_tensors
from tests.training_utils import compose_train, train_cfg, train_with_callbacks


@pytest.fixture(scope="module")
def sample_metadata(tmp_path_factory) -> Path:
    return make_sample_dataset(tmp_path_factory.mktemp("data"), n=4, size=32)


def optimizer_steps_taken(checkpoint_path) -> set[int]:
    state = torch.load(checkpoint_path, weights_only=True)["optimizer_states"][0]["state"]
    return {int(entry["step"]) for entry in state.values()}


# ---------------------------------------------------------------------------------------------------- faults
def test_nan_gradients_skip_the_step_and_are_counted(tmp_path, tiny_edit_path, sample_metadata):
    cfg = train_cfg(
        tmp_path,
        tiny_edit_path,
        sample_metadata,
        ["trainer.max_steps=5", "callbacks.model_checkpoint.every_n_train_steps=5", "optim.lr=1e-3"],
    )
    result = train_with_callbacks(cfg, [PoisonGradients({2, 4})])
    assert result["metrics"]["train/skipped_steps"] == 2
    # The two poisoned steps never reached AdamW: its per-parameter step counters saw 3 updates, not 5.
    assert optimizer_steps_taken(result["checkpoint"]) == {3}
    assert torch.load(result["checkpoint"], weights_only=True)["global_step"] == 5
    assert all(torch.isfinite(t).all() for t in lora_tensors(result["lora_path"]).values())


def test_a_streak_of_nan_losses_stops_the_run_keeping_the_last_good_lora(
    tmp_path, tiny_edit_path, sample_metadata, monkeypatch
):
    common = ["optim.lr=1e-3", "faults.max_consecutive_nonfinite=3"]
    reference = train(train_cfg(tmp_path / "ref", tiny_edit_path, sample_metadata, [*common, "trainer.max_steps=2"]))

    original = EditLoRAModule.compute_loss

    def poisoned(self, inputs, seed, rows=None):
        loss, sigmas = original(self, inputs, seed, rows)
        if self.training and self.global_step >= 2:  # steps 3, 4, 5, ... (1-based)
            loss = loss * float("nan")
        return loss, sigmas

    monkeypatch.setattr(EditLoRAModule, "compute_loss", poisoned)
    cfg = train_cfg(tmp_path / "bad", tiny_edit_path, sample_metadata, [*common, "trainer.max_steps=10"])
    with pytest.raises(NonFiniteTrainingError, match=r"3 optimizer steps in a row .* last good LoRA is .*last-good"):
        train(cfg)
    last_good = tmp_path / "bad" / "run" / "lora" / "last-good.safetensors"
    kept, expected = lora_tensors(last_good), lora_tensors(reference["lora_path"])
    assert kept.keys() == expected.keys()
    for key in kept:  # the weights after the last finite step (2), untouched by the NaN steps
        assert torch.equal(kept[key], expected[key]), key


def test_guard_state_survives_resume():
    from fusedit.training.faults import NonFiniteGuard

    guard = NonFiniteGuard(max_consecutive=2)
    guard.skipped, guard.consecutive = 7, 1
    restored = NonFiniteGuard(max_consecutive=2)
    restored.load_state_dict(guard.state_dict())
    assert (restored.skipped, restored.consecutive) == (7, 1)
    with pytest.raises(ValueError, match="max_consecutive_nonfinite"):
        NonFiniteGuard(max_consecutive=0)


# ---------------------------------------------------------------------------------------------------- signals
def test_sigint_stops_after_the_step_with_a_checkpoint(tmp_path, tiny_edit_path, sample_metadata):
    cfg = train_cfg(tmp_path, tiny_edit_path, sample_metadata, ["trainer.max_steps=8"])
    before = signal.getsignal(signal.SIGINT)
    result = train_with_callbacks(cfg, [SendSignal(3, signal.SIGINT)])
    assert result["stopped_by"] == "SIGINT" and result["exit_code"] == 130
    checkpoint = torch.load(result["checkpoint"], weights_only=True)
    assert checkpoint["global_step"] == 3  # the step that was running when Ctrl-C came, not one more
    assert signal.getsignal(signal.SIGINT) is before  # the handler is restored after fit


def test_sigterm_late_in_a_step_still_stops_with_a_step_aligned_checkpoint(tmp_path, tiny_edit_path, sample_metadata):
    # The race CI once hit: SIGTERM after GracefulStop's check but before Lightning's own end-of-step check.
    # Lightning alone would end fit with a code-less SystemExit (status 0) and no checkpoint of ours.
    cfg = train_cfg(tmp_path, tiny_edit_path, sample_metadata, ["trainer.max_steps=8"])
    before = signal.getsignal(signal.SIGTERM)
    result = train_with_callbacks(cfg, [SendSignal(3, signal.SIGTERM, at_step_end=True)])
    assert result["stopped_by"] == "SIGTERM" and result["exit_code"] == 143
    checkpoint = torch.load(result["checkpoint"], weights_only=True)
    assert checkpoint["global_step"] == 4  # seen at the next step's end: one step later, aligned
    assert signal.getsignal(signal.SIGTERM) is before


# ---------------------------------------------------------------------------------------------------- bad configs
def _problems(overrides):
    cfg = compose_train(overrides)
    with pytest.raises(ConfigError) as error:
        validate_train_config(cfg)
    return str(error.value)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("lora.rank=0", "lora.rank must be an integer >= 1, got 0"),
        ("lora.alpha=-1", "lora.alpha must be a finite number > 0"),
        ("lora.alpha=inf", "lora.alpha must be a finite number > 0, got inf"),
        ("optim.weight_decay=nan", "optim.weight_decay must be a finite number >= 0, got nan"),
        ("seed=-5", "seed must be an integer in [0, 2**32), got -5"),
        ("trainer.max_steps=-1", "trainer.max_steps=-1 needs trainer.max_epochs >= 1 (got -1)"),
        ("ckpt_path=/nonexistent/run", "ckpt_path=/nonexistent/run does not exist; give a run directory"),
        ("optim.lr=-1e-4", "optim.lr must be a finite number > 0, got -0.0001"),
        ("optim.lr=nan", "optim.lr must be a finite number > 0"),
        ("lora.targets=[to_qkv,to_kqv]", "unknown LoRA target(s) ['to_kqv'] for Qwen-Image. Valid: a named layout"),
        ("trainer.max_steps=0", "trainer.max_steps must be >= 1"),
        ("data.batch_size=0", "data.batch_size must be an integer >= 1"),
        ("faults.max_consecutive_nonfinite=0", "faults.max_consecutive_nonfinite must be an integer >= 1"),
        ("data.metadata=/nonexistent/meta.csv", "data.metadata=/nonexistent/meta.csv does not exist"),
        ("model.path=/nonexistent/model", "model.path=/nonexistent/model does not exist"),
        ("optim.weight_decay=-0.1", "optim.weight_decay must be a finite number >= 0"),
        ("optim.grad_clip=0", "optim.grad_clip must be > 0 or null"),
        ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches must be an integer >= 1"),
        ("lora.dropout=1.0", "lora.dropout must be in [0, 1)"),
        ("precision.fp8=yes", "precision.fp8 must be one of none | storage | float8, got 'yes'"),
        ("model.layout=fused", "model.layout must be one of merged_qkv | standard, got 'fused'"),
        ("model.activation_checkpointing=-1", "model.activation_checkpointing must be an integer >= 0, got -1"),
        ("model.checkpoint_offload=true", "model.checkpoint_offload=true needs model.activation_checkpointing >= 1"),
        ("model.attention=flash2", "model.attention must be one of auto | cudnn | flash | efficient | math"),
    ],
)
def test_bad_config_values_are_named(override, expected):
    assert expected in _problems([override])


def test_max_steps_minus_one_with_max_epochs_is_accepted():
    validate_train_config(compose_train(["trainer.max_steps=-1", "trainer.max_epochs=2"]), check_paths=False)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_metadata_that_is_a_fifo_or_dev_zero_says_what_it_is(tmp_path):
    os.mkfifo(tmp_path / "pipe.csv")
    (tmp_path / "zero.csv").symlink_to("/dev/zero")
    assert f"data.metadata={tmp_path / 'pipe.csv'} is a FIFO (named pipe), not a regular file" in _problems(
        [f"data.metadata={tmp_path / 'pipe.csv'}"]
    )
    assert "is a character device, not a regular file" in _problems([f"data.metadata={tmp_path / 'zero.csv'}"])


def test_gpu_trainer_on_a_machine_without_cuda_is_refused(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    message = _problems(["trainer=h100"])
    assert "trainer.accelerator=gpu (a GPU trainer profile), but this machine has no CUDA GPU" in message
    assert "trainer=cpu" in message


def test_every_problem_is_listed_at_once():
    message = _problems(["lora.rank=0", "optim.lr=-1"])
    assert message.startswith("invalid training config\n")
    assert "lora.rank" in message and "optim.lr" in message


def test_a_model_path_that_is_not_a_qwen_image_pipeline(tmp_path, tiny_edit_path):
    other = tmp_path / "sd"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (other / "transformer").mkdir()
    (other / "transformer" / "config.json").write_text("{}")
    message = _problems([f"model.path={other}"])
    assert "is not a Qwen-Image model: fusedit detect says:" in message
    # A transformer folder alone (detect: kind transformer) cannot train: the conditioner needs the pipeline.
    message = _problems([f"model.path={tiny_edit_path / 'transformer'}"])
    assert (
        "is a transformer (qwen-image)" in message and "training needs a Qwen-Image(-Edit) pipeline folder" in message
    )
    # A LoRA file is named as what it is.
    lora = tmp_path / "x.safetensors"
    save_file(
        {
            "transformer.proj_out.lora_A.weight": torch.zeros(2, 4),
            "transformer.proj_out.lora_B.weight": torch.zeros(4, 2),
        },
        str(lora),
    )
    assert "is a lora" in _problems([f"model.path={lora}"])


def test_a_text_to_image_pipeline_passes_the_model_check(tiny_t2i_path):
    # Qwen-Image (text-to-image) trains now (tests/test_text_to_image.py refuses its rows that name an edit image).
    validate_train_config(compose_train([f"model.path={tiny_t2i_path}"]), check_paths=False)


def test_user_errors_are_told_apart_from_bugs(tmp_path):
    from fusedit.errors import user_error_message
    from fusedit.training.checkpoint import resolve_checkpoint

    with pytest.raises(FileNotFoundError) as error:
        resolve_checkpoint(tmp_path / "nope")
    assert user_error_message(error.value).startswith("ckpt_path=")
    assert user_error_message(ConfigError("x")) == "x"
    assert user_error_message(CheckpointError("y")) == "y"
    assert user_error_message(KeyError("bug")) is None  # a bug keeps its traceback


def test_validation_runs_before_anything_is_loaded(tmp_path, monkeypatch):
    import fusedit.training.train as train_module

    def must_not_run(*args, **kwargs):
        raise AssertionError("the model was built before the config was validated")

    monkeypatch.setattr(train_module, "build_module", must_not_run)
    monkeypatch.setattr(train_module, "fill_demo_paths", must_not_run)
    cfg = train_cfg(tmp_path, tmp_path / "missing-model", tmp_path / "missing.csv", ["lora.rank=0"])
    with pytest.raises(ConfigError, match="lora.rank") as error:
        train(cfg)
    assert "missing-model does not exist" in str(error.value) and "missing.csv does not exist" in str(error.value)


# ---------------------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, tiny_edit_path, sample_metadata):
    tmp = tmp_path_factory.mktemp("saved")
    return train(
        train_cfg(
            tmp,
            tiny_edit_path,
            sample_metadata,
            ["trainer.max_steps=1", "callbacks.model_checkpoint.every_n_train_steps=1"],
        )
    )


def _resume(tmp_path, tiny_edit_path, sample_metadata, checkpoint, extra=()):
    cfg = train_cfg(
        tmp_path, tiny_edit_path, sample_metadata, ["trainer.max_steps=2", f"ckpt_path={checkpoint}", *extra]
    )
    return train(cfg)


def test_a_checkpoint_with_nan_weights_is_refused_naming_the_key(tmp_path, saved_run, tiny_edit_path, sample_metadata):
    checkpoint = torch.load(saved_run["checkpoint"], weights_only=True)
    key = sorted(checkpoint["state_dict"])[3]
    checkpoint["state_dict"][key][0, 0] = float("nan")
    path = tmp_path / "nan.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match=rf"holds non-finite weights: {key.replace('.', '[.]')} \(1 NaN"):
        _resume(tmp_path, tiny_edit_path, sample_metadata, path)


def test_a_checkpoint_with_nan_optimizer_state_is_refused(tmp_path, saved_run, tiny_edit_path, sample_metadata):
    checkpoint = torch.load(saved_run["checkpoint"], weights_only=True)
    checkpoint["optimizer_states"][0]["state"][0]["exp_avg_sq"].fill_(float("inf"))
    path = tmp_path / "inf.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(
        CheckpointError, match=r"non-finite optimizer state: optimizer_states\[0\]\.state\.0\.exp_avg_sq"
    ):
        _resume(tmp_path, tiny_edit_path, sample_metadata, path)


def test_a_checkpoint_of_other_lora_settings_is_refused_with_shapes(
    tmp_path, saved_run, tiny_edit_path, sample_metadata
):
    with pytest.raises(CheckpointError) as error:
        _resume(tmp_path, tiny_edit_path, sample_metadata, saved_run["checkpoint"], ["lora.rank=8"])
    message = str(error.value)
    assert (
        "tensors have the wrong shape" in message
        and "lora_A.default.weight: file [4, " in message
        and "model [8, " in message
    )


def test_a_checkpoint_of_another_model_is_refused_with_keys(tmp_path, saved_run, tiny_edit_path, sample_metadata):
    # Another model: one more transformer block than this one (keys the model lacks) and one block fewer.
    checkpoint = torch.load(saved_run["checkpoint"], weights_only=True)
    state = checkpoint["state_dict"]
    for key in [k for k in state if ".transformer_blocks.1." in k]:
        state[key.replace(".transformer_blocks.1.", ".transformer_blocks.7.")] = state.pop(key)
    path = tmp_path / "other.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError) as error:
        _resume(tmp_path, tiny_edit_path, sample_metadata, path)
    message = str(error.value)
    assert "LoRA tensors of the model are missing: transformer.transformer_blocks.1." in message
    assert "tensors the model does not have: transformer.transformer_blocks.7." in message


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path, tiny_edit_path, sample_metadata):
    path = tmp_path / "junk.ckpt"
    path.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="cannot be read with weights_only=True"):
        _resume(tmp_path, tiny_edit_path, sample_metadata, path)


# ---------------------------------------------------------------------------------------------------- LoRA files
def _tiny_transformer(tiny_edit_path):
    from fusedit.model import load_transformer

    return load_transformer(tiny_edit_path, "standard")


def _lora_file(path, modules: dict[str, tuple[int, int]], rank=2, fill=0.01):
    tensors = {}
    for module, (inp, out) in modules.items():
        tensors[f"transformer.{module}.lora_A.weight"] = torch.full((rank, inp), fill)
        tensors[f"transformer.{module}.lora_B.weight"] = torch.full((out, rank), fill)
    save_file(tensors, str(path))
    return path


def test_a_lora_with_nan_weights_is_refused_where_every_lora_is_read(tmp_path, tiny_edit_path):
    from fusedit.convert import read_lora
    from fusedit.inference.lora import LoraSpec, load_loras

    transformer = _tiny_transformer(tiny_edit_path)
    layer = transformer.transformer_blocks[0].attn.to_q
    path = _lora_file(
        tmp_path / "nan.safetensors", {"transformer_blocks.0.attn.to_q": (layer.in_features, layer.out_features)}
    )
    tensors = lora_tensors(path)
    tensors["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"][1, 0] = float("inf")
    save_file(tensors, str(path))
    match = (
        r"non-finite \(NaN/inf\) values in 1 tensors: transformer\.transformer_blocks\.0\.attn\.to_q\.lora_B\.weight"
    )
    with pytest.raises(ValueError, match=match):
        read_lora(path)
    with pytest.raises(ValueError, match=match):
        load_loras(transformer, [LoraSpec(str(path))])


def test_a_lora_for_another_hidden_size_is_refused_naming_the_module(tmp_path, tiny_edit_path):
    from fusedit.inference.lora import LoraSpec, load_loras

    transformer = _tiny_transformer(tiny_edit_path)
    layer = transformer.transformer_blocks[0].attn.to_q
    wider = (layer.in_features * 2, layer.out_features * 2)
    path = _lora_file(tmp_path / "wide.safetensors", {"transformer_blocks.0.attn.to_q": wider})
    with pytest.raises(ValueError, match=r"does not fit .*transformer_blocks\.0\.attn\.to_q: lora_A \[2, "):
        load_loras(transformer, [LoraSpec(str(path))])


def test_a_lora_for_more_blocks_is_refused_naming_the_modules(tmp_path, tiny_edit_path):
    from fusedit.inference.lora import LoraSpec, load_loras

    transformer = _tiny_transformer(tiny_edit_path)
    layer = transformer.transformer_blocks[0].attn.to_q
    shape = (layer.in_features, layer.out_features)
    path = _lora_file(
        tmp_path / "deep.safetensors",
        {"transformer_blocks.0.attn.to_q": shape, "transformer_blocks.59.attn.to_q": shape},
    )
    with pytest.raises(ValueError, match=r"does not have: transformer_blocks\.59\.attn\.to_q — is it"):
        load_loras(transformer, [LoraSpec(str(path))])


# ---------------------------------------------------------------------------------------------------- paths
def test_an_inference_csv_cannot_read_outside_its_folder(tmp_path):
    from fusedit.inference.inputs import collect_jobs
    from tests.data_helpers import save_image

    folder = tmp_path / "jobs"
    folder.mkdir()
    save_image(folder / "a.png", (32, 32), (1, 2, 3))
    save_image(tmp_path / "secret.png", (32, 32), (1, 2, 3))
    csv = folder / "jobs.csv"
    csv.write_text(f"image,edit_image,prompt\n,a.png,ok\n../secret.png,a.png,x\n,{tmp_path / 'secret.png'},y\n")
    with pytest.raises(ValueError) as error:
        collect_jobs(str(csv), None, {})
    message = str(error.value)
    assert "row 3 column 'image': path '../secret.png' refused: path escapes the CSV's folder" in message
    assert (
        "row 4 column 'edit_image'" in message and "absolute path refused (set csv.allow_absolute_paths=true" in message
    )
    # Allowed explicitly, absolute paths work; `..` never does.
    csv.write_text(f"edit_image,prompt\n{tmp_path / 'secret.png'},y\n")
    jobs = collect_jobs(str(csv), None, {"allow_absolute_paths": True})
    assert jobs[0].images == (tmp_path / "secret.png",)


def test_output_names_from_a_csv_stay_in_the_output_folder(tmp_path):
    from PIL import Image

    from fusedit.inference.inputs import Job, collect_jobs
    from fusedit.inference.outputs import OutputPaths

    folder = tmp_path / "jobs"
    (folder / "deep").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(folder / "deep" / "..png", format="PNG")  # a file whose stem is ".."
    csv = folder / "jobs.csv"
    csv.write_text("edit_image,prompt\ndeep/..png,x\n")
    out = tmp_path / "out"
    jobs = collect_jobs(str(csv), None, {})
    paths = OutputPaths(out, jobs)
    for job in jobs:
        assert paths.image(job).parent == out and paths.sheet(job).parent == out
    with pytest.raises(ValueError, match="cannot be an output file name"):
        OutputPaths(out, [Job("../../escape", "p")]).image(Job("../../escape", "p"))


def test_inference_never_writes_over_its_inputs_or_an_earlier_run(tmp_path):
    from PIL import Image

    from fusedit.inference.inputs import collect_jobs
    from fusedit.inference.outputs import OutputPaths

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("cat", "dog"):
        Image.new("RGB", (8, 8)).save(photos / f"{name}.png")
    jobs = collect_jobs(str(photos), "x")
    with pytest.raises(UserInputError, match="would write over the input .*cat.png"):
        OutputPaths(photos, jobs)  # the folder itself: cat.png would be replaced by its edit
    with pytest.raises(UserInputError, match="would write over the input .*cat.png"):
        OutputPaths(photos / "cat.png", collect_jobs(str(photos / "cat.png"), "x"))
    with pytest.raises(UserInputError, match="would write over the input .*cat_compare.png"):
        Image.new("RGB", (8, 8)).save(photos / "cat_compare.png")  # a sheet beside its image is not an input...
        assert [job.name for job in collect_jobs(str(photos), "x")] == ["cat", "dog"]
        OutputPaths(photos / "cat_compare.png", collect_jobs(str(photos / "cat_compare.png"), "x"))
    (photos / "cat_compare.png").unlink()
    jpgs = tmp_path / "jpgs"
    jpgs.mkdir()
    Image.new("RGB", (8, 8)).save(jpgs / "cat.jpg")
    with pytest.raises(UserInputError, match="is the folder of the input images"):
        OutputPaths(jpgs, collect_jobs(str(jpgs), "x"))  # cat.png and cat_compare.png would join the inputs

    out = tmp_path / "out"
    paths = OutputPaths(out, jobs)
    out.mkdir()
    paths.record.write_text("{}")
    (out / "cat.png").write_bytes(b"")
    with pytest.raises(UserInputError, match=r"already holds results of an earlier run .*cat\.png.*overwrite=true"):
        OutputPaths(out, jobs)
    OutputPaths(out, jobs, overwrite=True)


def test_each_inference_run_gets_its_own_default_folder():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(Path(__file__).parents[1] / "conf"), version_base="1.3"):
        cfg = compose("infer", ["model.path=x"])
    assert str(cfg.output).startswith("outputs/infer/") and cfg.overwrite is False


def test_run_outputs_stay_inside_the_run_dir(tmp_path, tiny_edit_path, sample_metadata):
    result = train(
        train_cfg(
            tmp_path, tiny_edit_path, sample_metadata, ["trainer.max_steps=1", "callbacks.lora_export.every_n_steps=1"]
        )
    )
    run_dir = result["run_dir"].resolve()
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    outside = [p for p in written if run_dir not in p.resolve().parents]
    assert outside == [] and written
    assert math.isfinite(result["metrics"]["train/loss"])


# ---------------------------------------------------------------------------------------------------- scale-out config
def test_slurm_launcher_and_distributed_trainer_configs_compose():
    cfg = compose_train(["hydra/launcher=fusedit_slurm", "hydra.launcher.nodes=2", "trainer=ddp"], hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (cfg.hydra.launcher.nodes, cfg.hydra.launcher.tasks_per_node) == (2, 8)
    for trainer in ("ddp", "fsdp"):
        # The data module shards its own aspect-ratio buckets; Lightning's sampler would break them.
        assert compose_train([f"trainer={trainer}"]).trainer.use_distributed_sampler is False


def test_fusedit_run_name_pins_the_run_dir_for_every_rank_and_restart(monkeypatch):
    from hydra.core.hydra_config import HydraConfig

    monkeypatch.setenv("FUSEDIT_RUN_NAME", "slurm-4242")
    dirs = []
    for _ in range(2):  # two processes (ranks, or the job before and after a requeue) compose at different times
        cfg = compose_train([], hydra_config=True)
        HydraConfig().set_config(cfg)
        dirs.append(cfg.hydra.run.dir)
    assert dirs[0] == dirs[1] and dirs[0].endswith("/train/runs/slurm-4242")


def test_a_run_dir_with_checkpoints_continues_from_the_newest(tmp_path, saved_run):
    from fusedit.training.checkpoint import auto_resume_checkpoint

    assert auto_resume_checkpoint(tmp_path) is None  # a fresh run dir starts fresh
    (tmp_path / "checkpoints").mkdir()
    checkpoint = torch.load(saved_run["checkpoint"], weights_only=True)
    torch.save(checkpoint, tmp_path / "checkpoints" / "last.ckpt")
    assert auto_resume_checkpoint(tmp_path) == tmp_path / "checkpoints" / "last.ckpt"
    checkpoint["global_step"] += 5  # Lightning's SLURM requeue handler saved a later one
    torch.save(checkpoint, tmp_path / "hpc_ckpt_1.ckpt")
    assert auto_resume_checkpoint(tmp_path) == tmp_path / "hpc_ckpt_1.ckpt"


def test_a_restarted_job_continues_in_its_run_dir(tmp_path, tiny_edit_path, sample_metadata):
    common = ["callbacks.model_checkpoint.every_n_train_steps=2"]
    first = train(train_cfg(tmp_path, tiny_edit_path, sample_metadata, [*common, "trainer.max_steps=2"]))
    # The same command in the same run dir (a requeued job): it continues at step 2 instead of starting over.
    rows = []

    from lightning.pytorch import Callback

    class Steps(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            rows.append(trainer.global_step)

    # Other settings under the same run dir (a reused FUSEDIT_RUN_NAME) are refused, listing the differences...
    with pytest.raises(UserInputError, match=r"(?s)trained with other settings.*trainer\.max_steps: 2 -> 4"):
        train(train_cfg(tmp_path, tiny_edit_path, sample_metadata, [*common, "trainer.max_steps=4"]))
    # ...unless asked for explicitly.
    again = train_with_callbacks(
        train_cfg(
            tmp_path, tiny_edit_path, sample_metadata, [*common, "trainer.max_steps=4", "accept_config_changes=true"]
        ),
        [Steps()],
    )
    assert again["run_dir"] == first["run_dir"] and rows == [2, 3]


def test_a_finished_run_is_not_fitted_again(tmp_path, saved_run, tiny_edit_path, sample_metadata, capsys):
    """Resuming a run already at trainer.max_steps says so, instead of "trained 1 steps / LoRA: (none written)"
    and an empty log version."""
    run_dir = saved_run["run_dir"]
    versions = sorted(p.name for p in run_dir.rglob("version_*"))
    capsys.readouterr()
    again = train(train_cfg(tmp_path, tiny_edit_path, sample_metadata, ["trainer.max_steps=1", f"ckpt_path={run_dir}"]))
    out = capsys.readouterr().out
    assert "already finished" in out and "step 1" in out and str(saved_run["lora_path"]) in out
    assert again["lora_path"] == saved_run["lora_path"]
    assert sorted(p.name for p in run_dir.rglob("version_*")) == versions


def test_a_damaged_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, saved_run, capsys):
    from fusedit.training.checkpoint import auto_resume_checkpoint, resolve_checkpoint

    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    torch.save(torch.load(saved_run["checkpoint"], weights_only=True), checkpoints / "step-000001.ckpt")
    (checkpoints / "last.ckpt").write_bytes(b"")  # 0 bytes: a full disk, or a copy that stopped
    (tmp_path / "hpc_ckpt_3.ckpt").write_bytes(b"PK\x03\x04torn")
    assert auto_resume_checkpoint(tmp_path) == checkpoints / "step-000001.ckpt"
    assert resolve_checkpoint(tmp_path) == (checkpoints / "step-000001.ckpt", tmp_path)
    err = capsys.readouterr().err
    assert f"skipping unreadable checkpoint {checkpoints / 'last.ckpt'}" in err and "hpc_ckpt_3.ckpt" in err
    assert f"continuing from {checkpoints / 'step-000001.ckpt'} (step 1)" in err


def test_a_run_dir_is_owned_by_one_process_and_a_killed_owner_does_not_leave_it_locked(
    tmp_path, tiny_edit_path, sample_metadata
):
    import subprocess
    import sys

    from fusedit.training.run_dir import RunDirLock

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with RunDirLock(run_dir), pytest.raises(UserInputError, match=r"run dir .*run is in use by pid \d+"):
        train(train_cfg(tmp_path, tiny_edit_path, sample_metadata, ["trainer.max_steps=1"]))
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from fusedit.training.run_dir import RunDirLock\n"
            "with RunDirLock(sys.argv[1]): print('held', flush=True); time.sleep(600)",
            str(run_dir),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserInputError, match=f"in use by pid {holder.pid}"), RunDirLock(run_dir):
            pass
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the kernel drops the lock
        holder.wait()
    with RunDirLock(run_dir):
        pass


def test_an_unwritable_lora_dir_is_found_before_the_model_loads(tmp_path, monkeypatch, tiny_edit_path, sample_metadata):
    import fusedit.training.train as train_module

    monkeypatch.setattr(train_module, "build_module", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "not-a-dir").write_text("a file where the LoRA folder should be")
    cfg = train_cfg(tmp_path, tiny_edit_path, sample_metadata, [f"callbacks.lora_export.dirpath={tmp_path}/not-a-dir"])
    with pytest.raises(UserInputError, match=r"callbacks\.lora_export\.dirpath=.*not-a-dir: cannot write there"):
        train(cfg)


def test_a_full_disk_at_a_lora_export_comes_after_that_steps_checkpoint(tmp_path, tiny_edit_path, sample_metadata):
    """The export due at step 1 fails (no space); the checkpoint of step 1 is already saved, so the run resumes
    from it instead of from the step before."""
    import errno

    import fusedit.training.callbacks as callbacks_module

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    original = callbacks_module.export_lora
    callbacks_module.export_lora = full_disk
    try:
        cfg = train_cfg(
            tmp_path,
            tiny_edit_path,
            sample_metadata,
            [
                "trainer.max_steps=3",
                "callbacks.model_checkpoint.every_n_train_steps=1",
                "callbacks.lora_export.every_n_steps=1",
            ],
        )
        with pytest.raises(OSError, match="No space left"):
            train(cfg)
    finally:
        callbacks_module.export_lora = original
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 1


def test_resuming_a_run_dir_without_its_settings_is_refused(tmp_path):
    from fusedit.training.train import run_overrides

    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(UserInputError, match=r"neither resumes\.yaml nor \.hydra/overrides\.yaml"):
        run_overrides(tmp_path)


def test_a_resume_logs_into_the_run_it_continues(tmp_path):
    from fusedit.training.run_dir import resume_hydra_overrides

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    extra = resume_hydra_overrides([f"ckpt_path={tmp_path / 'run'}", "trainer.max_steps=9"])
    assert extra[0] == f"hydra.run.dir='{(tmp_path / 'run').resolve()}'"
    assert extra[1].startswith("hydra.output_subdir=.hydra/resume-")  # the run's own .hydra/ files are kept
    assert resume_hydra_overrides([f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}"]) == []  # no file
    assert resume_hydra_overrides(["trainer.max_steps=9"]) == []
    assert resume_hydra_overrides(["-m", f"ckpt_path={tmp_path / 'run'}"]) == []


def test_lora_exports_and_samples_keep_the_newest(tmp_path):
    from fusedit.training.callbacks import prune_steps

    for step in (1, 2, 3):
        (tmp_path / f"step-{step:06d}.safetensors").write_bytes(b"")
        (tmp_path / f"step-{step:06d}.merged_qkv.safetensors").write_bytes(b"")
    (tmp_path / "final.safetensors").write_bytes(b"")
    assert len(prune_steps(tmp_path, "step-*.safetensors", 1)) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "final.safetensors",
        "step-000003.merged_qkv.safetensors",
        "step-000003.safetensors",
    ]
    assert prune_steps(tmp_path, "step-*.safetensors", 0) == []  # 0 keeps all


def test_a_multirun_refuses_a_strategy_that_relaunches_the_script():
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from lightning.pytorch import Trainer
    from omegaconf import open_dict

    from fusedit.training.validate_config import refuse_subprocess_launch_in_multirun

    def hydra_mode(mode):
        cfg = compose_train([], hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.mode = mode
        HydraConfig().set_config(cfg)

    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False)
    hydra_mode(RunMode.RUN)
    refuse_subprocess_launch_in_multirun(trainer)  # a single run: Lightning's re-launch is how DDP starts
    hydra_mode(RunMode.MULTIRUN)
    try:
        with pytest.raises(ConfigError, match="would re-run the whole sweep in every rank"):
            refuse_subprocess_launch_in_multirun(trainer)
        one_device = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
        refuse_subprocess_launch_in_multirun(one_device)  # nothing is re-launched: fine in a sweep
    finally:
        hydra_mode(RunMode.RUN)


def test_config_differences_ignore_what_a_resume_changes_by_itself():
    from omegaconf import OmegaConf

    from fusedit.training.run_dir import config_differences

    recorded = OmegaConf.create(
        {"paths": {"output_dir": "${hydra:runtime.output_dir}", "log_dir": "a"}, "ckpt_path": None, "lora": {"rank": 4}}
    )
    resumed = OmegaConf.create(
        {"paths": {"output_dir": "/runs/x", "log_dir": "a"}, "ckpt_path": "/runs/x", "lora": {"rank": 8}, "new": 1}
    )
    assert config_differences(recorded, resumed) == ["lora.rank: 4 -> 8", "new: '(absent)' -> 1"]
