"""fusedit: LoRA fine-tuning of Qwen-Image-Edit with merged QKV projections."""

__version__ = "0.1.0"
