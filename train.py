"""Train a Qwen-Image-Edit LoRA: `python train.py [group=option ...] [key=value ...]` (see conf/ and README)."""

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from fusedit.training.errors import user_error_message
    from fusedit.training.train import resume_config, sweep_metric, train

    try:
        cfg = resume_config(cfg, list(HydraConfig.get().overrides.task))
        result = train(cfg)
    except Exception as error:
        message = user_error_message(error)
        if message is None:
            raise
        # fusedit's own refusals already say what is wrong and how to fix it: no stack trace on top.
        print(f"fusedit: error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)
    if result.get("exit_code"):
        sys.exit(result["exit_code"])  # stopped by a signal: checkpoint saved, run not finished
    return sweep_metric(result, cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
