"""fusedit: LoRA fine-tuning of Qwen-Image-Edit with merged QKV projections.

The public helpers are imported lazily so that `import fusedit` stays cheap (no torch/diffusers import).
"""

from fusedit._lazy import lazy_getattr

__version__ = "0.1.0"

_EXPORTS = {
    "fuse_qkv": "fusedit.model.merged_qkv",
    "unfuse_qkv": "fusedit.model.merged_qkv",
    "is_merged": "fusedit.model.merged_qkv",
    "load_transformer": "fusedit.model.loading",
    "convert_state_dict": "fusedit.convert",
    "detect": "fusedit.detect",
    "make_tiny": "fusedit.tiny",
}


__getattr__ = lazy_getattr(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
