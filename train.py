"""Train a Qwen-Image-Edit LoRA: `python train.py [group=option ...] [key=value ...]` (see conf/ and README)."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from fusedit.training.train import resume_config, sweep_metric, train

    cfg = resume_config(cfg, list(HydraConfig.get().overrides.task))
    return sweep_metric(train(cfg), cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
