"""Memory soak: train the tiny model for many steps on CPU and record resident memory every N steps.

    python scripts/memory_soak.py --steps 2000 --every 100 --out soak.json [extra Hydra overrides ...]

A leak that costs a few KB per step (a tensor kept in a list, a growing metrics buffer, a logger cache) is
invisible in a 30-step test and fatal after 100k steps. The RSS of the training process is read from
/proc/self/status (VmRSS) at every `--every`-th optimizer step; the report compares the RSS after a warm-up
(allocator pools, lazily built kernels and caches settle in the first few hundred steps) with the end.
Results of a run are in docs/reliability.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def make_recorder(every: int):
    from lightning.pytorch import Callback

    class RSSRecorder(Callback):
        def __init__(self):
            self.samples: list[dict] = []
            self.started = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step
            if step == 1 or step % every == 0:
                gc.collect()
                self.samples.append(
                    {
                        "step": step,
                        "rss_mb": round(rss_mb(), 2),
                        "elapsed_s": round(time.perf_counter() - self.started, 1),
                    }
                )
                print(f"soak: step {step:6d}  rss {self.samples[-1]['rss_mb']:8.1f} MB", flush=True)

    return RSSRecorder()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=200, help="growth is measured from the first sample >= this")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import fusedit.training.train as train_module
    from fusedit.io import write_json_atomic

    work = Path(tempfile.mkdtemp(prefix="fusedit-soak-"))
    overrides = [
        f"paths.root_dir={work}",
        f"paths.output_dir={work / 'run'}",
        f"paths.cache_dir={ROOT / 'outputs' / '.cache'}",
        "logger=csv",
        f"trainer.max_steps={args.steps}",
        "trainer.log_every_n_steps=50",
        "callbacks.validation_images.num_samples=0",
        "callbacks.progress_bar=null",
        f"callbacks.model_checkpoint.every_n_train_steps={max(args.steps // 4, 1)}",
        f"callbacks.lora_export.every_n_steps={max(args.steps // 4, 1)}",
        "lora.rank=4",
        "lora.alpha=4",
        *args.overrides,
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
        HydraConfig().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        recorder = make_recorder(args.every)
        original = train_module.build_callbacks
        train_module.build_callbacks = lambda c: [*original(c), recorder]
        try:
            train_module.train(cfg)
        finally:
            train_module.build_callbacks = original
            # The run's checkpoints and LoRA exports are not the soak's result (the RSS samples are).
            shutil.rmtree(work, ignore_errors=True)

    samples = recorder.samples
    base = next((s for s in samples if s["step"] >= args.warmup), samples[0])
    end = samples[-1]
    steps = max(end["step"] - base["step"], 1)
    report = {
        "steps": args.steps,
        "overrides": overrides,
        "rss_first_mb": samples[0]["rss_mb"],
        "rss_after_warmup_mb": base["rss_mb"],
        "warmup_step": base["step"],
        "rss_end_mb": end["rss_mb"],
        "rss_max_mb": max(s["rss_mb"] for s in samples),
        "growth_after_warmup_mb": round(end["rss_mb"] - base["rss_mb"], 2),
        "growth_per_1000_steps_mb": round((end["rss_mb"] - base["rss_mb"]) * 1000 / steps, 2),
        "wall_s": end["elapsed_s"],
        "samples": samples,
    }
    summary = {k: v for k, v in report.items() if k not in ("samples", "overrides")}
    print(json.dumps(summary, indent=2))
    if args.out:
        write_json_atomic(args.out, report)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
