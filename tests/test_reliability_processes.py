"""`python train.py` as real processes: SIGTERM mid-run then resume == an uninterrupted run; one-line config
errors; DDP with 2 CPU processes (gloo) == 1 process with the same global batch, in one run dir."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fusedit.data import make_sample_dataset
from tests.reliability_helpers import lora_tensors
from tests.training_utils import REPO, script_env


@pytest.fixture(scope="module")
def sample_metadata(tmp_path_factory) -> Path:
    return make_sample_dataset(tmp_path_factory.mktemp("data"), n=4, size=32)


def _env() -> dict:
    # OMP_NUM_THREADS=1: determinism across processes, and no oversubscription on small machines.
    env = script_env(REPO, OMP_NUM_THREADS="1", WANDB_MODE="offline")
    env.pop("LOCAL_RANK", None)
    return env


def _common(model, metadata) -> list[str]:
    return [
        f"model.path={model}",
        f"data.metadata={metadata}",
        "logger=csv",
        "callbacks.validation_images.num_samples=0",
        "callbacks.progress_bar=null",
        "callbacks.lora_export.every_n_steps=0",
        "lora.rank=4",
        "lora.alpha=4",
        "optim.lr=1e-3",
        "trainer.deterministic=true",
    ]


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=cwd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(process: subprocess.Popen, timeout: float = 240) -> str:
    output, _ = process.communicate(timeout=timeout)
    return output


def test_sigterm_mid_run_then_resume_equals_an_uninterrupted_run(tmp_path, tiny_edit_path, sample_metadata):
    # 10 steps of batch 1 over 4 samples: the resume lands inside an epoch and crosses two epoch boundaries.
    common = [
        *_common(tiny_edit_path, sample_metadata),
        "data.batch_size=1",
        "trainer.max_steps=10",
        "callbacks.model_checkpoint.every_n_train_steps=2",
    ]
    interrupted_dir, reference_dir = tmp_path / "interrupted", tmp_path / "reference"
    slow = "+callbacks.slow={_target_:tests.reliability_helpers.Sleep,seconds:0.4}"
    interrupted = _start([*common, slow, f"hydra.run.dir={interrupted_dir}"], tmp_path)
    reference = _start([*common, f"hydra.run.dir={reference_dir}"], tmp_path)

    checkpoint = interrupted_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 180
    while not checkpoint.is_file() and interrupted.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert checkpoint.is_file(), "no checkpoint appeared"
    interrupted.send_signal(signal.SIGTERM)
    output = _finish(interrupted)
    assert interrupted.returncode == 128 + signal.SIGTERM, output[-3000:]
    stopped_at = torch.load(checkpoint, weights_only=True)["global_step"]
    assert 2 <= stopped_at < 10
    assert f"stopped by SIGTERM after step {stopped_at} (checkpoint saved)" in output
    assert not (interrupted_dir / "lora" / "final.safetensors").exists()  # an interrupted run is not final

    resumed = _start(["ckpt_path=" + str(interrupted_dir), "++callbacks.slow.seconds=0"], tmp_path)
    output = _finish(resumed)
    assert resumed.returncode == 0, output[-3000:]
    assert "fusedit: trained 10 steps" in output
    # The resume logged into the run it continued: no stray outputs/train/runs/<time>/ of its own.
    assert not (tmp_path / "outputs" / "train" / "runs").exists()
    assert list(interrupted_dir.glob(".hydra/resume-*/overrides.yaml")) and (interrupted_dir / "train.log").is_file()
    reference_output = _finish(reference)
    assert reference.returncode == 0, reference_output[-3000:]

    assert torch.load(checkpoint, weights_only=True)["global_step"] == 10
    resumed_lora = lora_tensors(interrupted_dir / "lora" / "final.safetensors")
    reference_lora = lora_tensors(reference_dir / "lora" / "final.safetensors")
    assert resumed_lora.keys() == reference_lora.keys()
    for key in resumed_lora:  # bit-identical: same step, data position, optimizer and LR state, noise
        assert torch.equal(resumed_lora[key], reference_lora[key]), key


def test_config_errors_are_one_line_without_a_traceback(tmp_path, sample_metadata):
    process = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "lora.rank=0", "optim.lr=-1", "model.path=/nonexistent"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode == 2
    assert "Traceback" not in process.stderr and "Traceback" not in process.stdout
    assert process.stderr.startswith("fusedit: error: invalid training config\n")
    for part in ("lora.rank must be an integer >= 1", "optim.lr must be", "model.path=/nonexistent does not exist"):
        assert part in process.stderr


def test_ddp_two_cpu_processes_match_one_process_with_the_same_global_batch(tmp_path, tiny_edit_path, sample_metadata):
    # Unshuffled, one aspect bucket: 1 x batch 2 and 2 ranks x batch 1 see the same two samples at every step,
    # and each sample draws its noise from its row, not its rank, so the averaged gradients are the same.
    common = [*_common(tiny_edit_path, sample_metadata), "data.shuffle=false", "trainer.max_steps=3"]
    single = _start([*common, "data.batch_size=2", f"hydra.run.dir={tmp_path / 'single'}"], tmp_path)
    ddp_cwd = tmp_path / "ddp"
    ddp = _start(
        [
            *common,
            "trainer=ddp",
            "precision=fp32",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.max_steps=3",
            "trainer.log_every_n_steps=1",
            "data.batch_size=1",
            "data.num_workers=0",
            "data.pin_memory=false",
            "callbacks.model_checkpoint.every_n_train_steps=3",
        ],
        ddp_cwd,
    )
    ddp_output, single_output = _finish(ddp), _finish(single)
    assert single.returncode == 0, single_output[-3000:]
    assert ddp.returncode == 0, ddp_output[-3000:]

    # Rank 1 re-ran the script: it must have joined rank 0's run dir, not made one of its own.
    runs = [p for p in (ddp_cwd / "outputs" / "train" / "runs").iterdir()]
    assert len(runs) == 1, runs
    run = runs[0]
    assert sorted(p.name for p in (run / "lora").iterdir()) == ["final.safetensors"]
    assert [p.name for p in (run / "csv").iterdir()] == ["version_0"]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert ddp_output.count("fusedit: trained 3 steps") == 1  # the report is rank zero's only

    ddp_lora = lora_tensors(run / "lora" / "final.safetensors")
    single_lora = lora_tensors(tmp_path / "single" / "lora" / "final.safetensors")
    assert ddp_lora.keys() == single_lora.keys()
    for key in ddp_lora:
        torch.testing.assert_close(ddp_lora[key], single_lora[key], rtol=1e-4, atol=1e-6)
    # Trained, non-zero LoRAs (B starts at zero), from two real ranks.
    assert any(key.endswith("lora_B.weight") and ddp_lora[key].abs().max() > 0 for key in ddp_lora)
    assert "MEMBER: 2/2" in ddp_output
