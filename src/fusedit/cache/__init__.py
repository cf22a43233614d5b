"""Latent and prompt-embedding cache: encode a dataset once, train from it without the VAE or text encoder.

keys (what a cached row depends on) -> store (safetensors shards + JSON index, per encoder fingerprint) ->
data (CachedEditDataModule: hash rows, encode only the missing ones, serve cached batches; CachedConditioner) ->
training (`cache.enabled=true` in train.py); validation (validation images from cached rows, VAE decoder only).
`fusedit cache [overrides]` (cli) fills the cache with the settings a `python train.py [overrides]` run would use,
so that run finds every row already encoded.
"""

from fusedit._lazy import lazy_getattr

# Imported on first use: `fusedit cache`'s parser must not load Lightning.
_EXPORTS = {
    "CACHE_FORMAT": "fusedit.cache.keys",
    "CacheCorruptError": "fusedit.cache.store",
    "CachedConditioner": "fusedit.cache.data",
    "CachedEditDataModule": "fusedit.cache.data",
    "CachedEditDataset": "fusedit.cache.data",
    "LatentCache": "fusedit.cache.store",
    "add_cli": "fusedit.cache.cli",
    "collate_cached": "fusedit.cache.data",
    "encoder_fingerprint": "fusedit.cache.keys",
    "row_key": "fusedit.cache.keys",
}

__getattr__ = lazy_getattr(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
