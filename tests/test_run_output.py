"""What a training run prints: every line once, no advertisement or warning the user cannot act on (a resume
included), and a progress bar that says what it counts."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest
from lightning.pytorch.callbacks.progress.rich_progress import ProcessingSpeedColumn
from lightning.pytorch.loggers import CSVLogger

from fusedit.data import make_sample_dataset
from fusedit.training.train import train
from tests.test_cli_ux import _configured_bar, _fit
from tests.training_utils import REPO, script_env

NOISE = (
    "💡 Tip",  # Lightning's litlogger advertisement
    "LeafSpec",  # Lightning's use of a deprecated torch pytree API
    "anonymous setting has no effect",  # wandb, about an argument Lightning passes
    "exists and is not empty",  # Lightning on resuming in the run's own directory, which fusedit does on purpose
    "Traceback",
)


def _run(args: list[str], cwd) -> str:
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=cwd,
        env=script_env(OMP_NUM_THREADS="1", WANDB_MODE="offline", COLUMNS="200"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def _assert_quiet(output: str) -> None:
    for noise in NOISE:
        assert noise not in output, f"{noise!r} printed:\n{output[-3000:]}"
    # Every log line once: without its timestamp and logger prefix, no message appears twice.
    messages = [line.split("] - ", 1)[-1].removeprefix("INFO: ").strip() for line in output.splitlines()]
    # (wandb separates the parts of its end-of-run summary with bare "wandb:" lines.)
    repeated = [m for m, n in Counter(m for m in messages if m not in ("", "wandb:") and "━" not in m).items() if n > 1]
    assert not repeated, repeated


def test_a_run_and_its_resume_print_each_line_once_and_no_noise(tmp_path, tiny_edit_path):
    metadata = make_sample_dataset(tmp_path / "data", n=2, size=32)
    common = [f"model.path={tiny_edit_path}", f"data.metadata={metadata}", "logger=wandb", "lora.rank=2",
              "callbacks.validation_images.num_samples=0", "callbacks.model_checkpoint.every_n_train_steps=1",
              f"hydra.run.dir={tmp_path / 'run'}", f"paths.root_dir={tmp_path}"]  # fmt: skip
    _assert_quiet(_run([*common, "trainer.max_steps=2"], tmp_path))
    _assert_quiet(_run([*common, f"ckpt_path={tmp_path / 'run'}", "trainer.max_steps=3"], tmp_path))


def test_the_debug_run_bar_names_itself_and_shows_no_version_or_meaningless_speed(tmp_path):
    bar = _configured_bar()
    seen = _fit(tmp_path, bar, fast_dev_run=True)
    assert [label for label, _, _ in seen] == ["Debug run (1 batch)"]
    assert not any(isinstance(column, ProcessingSpeedColumn) for column in bar.configure_columns(bar.trainer))
    bar = _configured_bar()
    _fit(tmp_path / "logged", bar, max_steps=2, max_epochs=-1)
    bar.trainer.loggers = [CSVLogger(tmp_path)]  # a logger with a version: Lightning would show it as v_num
    assert "v_num" not in bar.get_metrics(bar.trainer, bar.trainer.lightning_module)
    assert any(isinstance(column, ProcessingSpeedColumn) for column in bar.configure_columns(bar.trainer))


def test_every_completed_step_is_logged_once_across_a_sigterm_stop_and_resume(tmp_path, tiny_edit_path):
    import csv
    import signal

    from tests.reliability_helpers import SendSignal
    from tests.training_utils import train_cfg, train_with_callbacks

    metadata = make_sample_dataset(tmp_path / "data", n=4, size=32)
    cfg = train_cfg(tmp_path, tiny_edit_path, metadata, ["trainer.max_steps=5"])
    stopped = train_with_callbacks(cfg, [SendSignal(3, signal.SIGTERM)])
    assert stopped["stopped_by"] == "SIGTERM"

    def logged() -> dict[int, list[float]]:
        losses: dict[int, list[float]] = {}
        for path in sorted((tmp_path / "run" / "csv").glob("version_*/metrics.csv")):
            for row in csv.DictReader(path.open()):
                if row.get("train/loss"):
                    losses.setdefault(int(row["step"]), []).append(float(row["train/loss"]))
        return losses

    before = logged()
    assert sorted(before) == [0, 1, 2]  # steps 1..3 (Lightning logs step k at index k - 1)
    # What the stop reports is the stopped step's own loss, not the one before it.
    assert stopped["metrics"]["train/loss"] == pytest.approx(before[2][0])
    resumed = train(
        train_cfg(tmp_path, tiny_edit_path, metadata, ["trainer.max_steps=5", f"ckpt_path={tmp_path / 'run'}"])
    )
    assert resumed["stopped_by"] is None
    after = logged()
    assert sorted(after) == [0, 1, 2, 3, 4] and all(len(values) == 1 for values in after.values()), after
