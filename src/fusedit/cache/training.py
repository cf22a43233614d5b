"""Hook the cache into `train(cfg)` (`cache.enabled=true`) and the `fusedit cache` command."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fusedit.cache.data import CachedConditioner, CachedEditDataModule
from fusedit.devices import to_dtype


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
        build_offload=cache.get("offload", False),
        verify=cache.verify,
        shard_mb=cache.shard_mb,
        **data,
    )


def prepare_cached_training(cfg: DictConfig) -> tuple[CachedEditDataModule, CachedConditioner]:
    """(data module, conditioner) for training from the cache; neither holds the VAE or text encoder. Validation
    images work: the conditioner loads the VAE decoder at the first round (fusedit.cache.validation)."""
    conditioner = CachedConditioner(Path(cfg.model.path), dtype=to_dtype(cfg.precision.base_dtype))
    return cached_datamodule(cfg), conditioner
