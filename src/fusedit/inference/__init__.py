"""Inference: diffusers' Qwen-Image pipelines with fusedit's transformer (either QKV layout), LoRAs in any format,
memory profiles, prompt enhancement. Entry point: `python infer.py` -> `preflight.preflight(cfg)` (every check,
no model loaded) -> `run.infer(cfg, plan)`."""
