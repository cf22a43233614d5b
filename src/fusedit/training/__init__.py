"""LoRA training of Qwen-Image-Edit: model build order (build), objective, conditioning, the LightningModule
(module), callbacks, checkpoints and `train(cfg)` (train). Entry point: `python train.py` (Hydra, conf/)."""
