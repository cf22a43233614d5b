"""Train a Qwen-Image-Edit LoRA: `python train.py [group=option ...] [key=value ...]` (see conf/ and README)."""

import sys

import hydra
from omegaconf import DictConfig

TYPED_ARGV = list(sys.argv)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    # Lightning's DDP launcher re-runs this script from sys.argv: as typed, without the resume's additions below.
    sys.argv = list(TYPED_ARGV)
    from fusedit.errors import refusals_as_one_line
    from fusedit.training.validate_config import check_ckpt_path, validate_train_config

    with refusals_as_one_line():
        if cfg.get("ckpt_path"):
            check_ckpt_path(cfg.ckpt_path)
            # The config to check is the run's own, recomposed; resume_config validates it before recording it.
            from fusedit.training.train import resume_config

            cfg = resume_config(cfg, list(HydraConfig.get().overrides.task))
        else:
            # Before torch, Lightning and diffusers are imported (most of the start-up time): a wrong value is
            # reported at once. train() checks again for callers that skip this script; that costs milliseconds.
            validate_train_config(cfg)
        from fusedit.training.train import sweep_metric, train

        result = train(cfg)
    if result.get("exit_code"):
        sys.exit(result["exit_code"])  # stopped by a signal: checkpoint saved, run not finished
    return sweep_metric(result, cfg.get("optimized_metric"))


if __name__ == "__main__":
    from fusedit.train_config import exit_on_bad_overrides
    from fusedit.training.run_dir import resume_hydra_overrides

    exit_on_bad_overrides("train", sys.argv[1:])  # a misspelt key as one line, exit 2 (Hydra: five lines, exit 1)

    # A resume logs into the run it continues, not into a stray new run dir (fusedit.training.run_dir).
    sys.argv += resume_hydra_overrides(sys.argv[1:])
    main()
