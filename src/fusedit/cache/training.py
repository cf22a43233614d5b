"""Hook the cache into `train(cfg)` (`cache.enabled=true`) and the `fusedit cache` command."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from fusedit.cache.data import CachedConditioner, CachedEditDataModule

log = logging.getLogger(__name__)


def cache_enabled(cfg: DictConfig) -> bool:
    return bool(cfg.get("cache") and cfg.cache.get("enabled"))


def cached_datamodule(cfg: DictConfig) -> CachedEditDataModule:
    """The data module `cfg.data` describes, reading encodings from `cfg.cache.dir` (encoding missing rows)."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    data.pop("_target_", None)
    cache = cfg.cache
    return CachedEditDataModule(
        cache_dir=cache.dir,
        model_path=cfg.model.path,
        dtype=cfg.precision.base_dtype,
        build=cache.build,
        build_batch_size=cache.batch_size,
        build_device=cache.device,
        verify=cache.verify,
        shard_mb=cache.shard_mb,
        **data,
    )


def prepare_cached_training(cfg: DictConfig) -> tuple[CachedEditDataModule, CachedConditioner]:
    """(data module, conditioner) for training from the cache; neither ever holds the VAE or text encoder.

    callbacks.validation_images is switched off: generating images needs the VAE and the 7B text encoder, whose
    memory the cache exists to save. Sample the exported LoRAs with `fusedit infer` instead.
    """
    images = (cfg.get("callbacks") or {}).get("validation_images")
    if images is not None and images.get("num_samples", 0) and (images.get("every_n_steps") or images.get("at_end")):
        log.warning(
            "cache.enabled=true: callbacks.validation_images is disabled (it would load the VAE and text encoder "
            "the cache avoids); sample the exported LoRA with `fusedit infer`"
        )
    if images is not None:
        with open_dict(cfg):
            cfg.callbacks.validation_images = None
    return cached_datamodule(cfg), CachedConditioner(Path(cfg.model.path))
