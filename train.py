"""Train a Qwen-Image-Edit LoRA: `python train.py [group=option ...] [key=value ...]` (see conf/ and README)."""

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from fusedit.errors import refusals_as_one_line
    from fusedit.training.train import resume_config, sweep_metric, train

    with refusals_as_one_line():
        cfg = resume_config(cfg, list(HydraConfig.get().overrides.task))
        result = train(cfg)
    if result.get("exit_code"):
        sys.exit(result["exit_code"])  # stopped by a signal: checkpoint saved, run not finished
    return sweep_metric(result, cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
