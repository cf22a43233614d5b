"""Edit images (or generate them from text) with a Qwen-Image pipeline, merged-QKV transformer and LoRAs.

    python infer.py model.path=DIR input=cat.png prompt="make it a ghost" output=out.png lora.path=run/lora/final.safetensors

See conf/infer.yaml and docs/inference.md.
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="infer")
def main(cfg: DictConfig) -> None:
    from fusedit.errors import refusals_as_one_line
    from fusedit.inference.preflight import preflight

    with refusals_as_one_line():
        # Before diffusers is imported and the pipeline loaded (seconds, then minutes): a missing input or LoRA
        # file, or a model of another family, is reported at once. infer() is handed the plan, not re-checking.
        plan = preflight(cfg)
        from fusedit.inference.run import infer

        infer(cfg, plan)


if __name__ == "__main__":
    import sys

    from fusedit.train_config import exit_on_bad_overrides

    exit_on_bad_overrides("infer", sys.argv[1:])  # a misspelt key as one line, exit 2 (Hydra: five lines, exit 1)
    main()
