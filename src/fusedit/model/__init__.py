"""The merged-QKV Qwen-Image transformer (merged_qkv), its loading (loading) and its module map (module_map).

The names below are imported on first use: `fusedit.model.module_map` is pure data, and reading it (config
validation, `fusedit detect`) must not load diffusers.
"""

from fusedit._lazy import lazy_getattr

_EXPORTS = {
    "MergedQKVAttnProcessor": "fusedit.model.merged_qkv",
    "fuse_qkv": "fusedit.model.merged_qkv",
    "is_merged": "fusedit.model.merged_qkv",
    "unfuse_qkv": "fusedit.model.merged_qkv",
    "load_transformer": "fusedit.model.loading",
}

__getattr__ = lazy_getattr(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
