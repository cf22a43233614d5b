"""fusedit: LoRA fine-tuning of Qwen-Image-Edit with merged QKV projections.

The public helpers are imported lazily so that `import fusedit` stays cheap (no torch/diffusers import).
`fusedit.detect` is the submodule (its function is `fusedit.detect.detect`): a lazy function of the same name was
replaced by the module as soon as anything imported `fusedit.detect`, so what the name meant depended on import order.
"""

from fusedit._lazy import lazy_getattr

__version__ = "0.1.0"

_EXPORTS = {
    "fuse_qkv": "fusedit.model.merged_qkv",
    "unfuse_qkv": "fusedit.model.merged_qkv",
    "is_merged": "fusedit.model.merged_qkv",
    "load_transformer": "fusedit.model.loading",
    "convert_state_dict": "fusedit.convert",
    "make_tiny": "fusedit.tiny",
}


__getattr__ = lazy_getattr(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
