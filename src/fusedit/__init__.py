"""fusedit: LoRA fine-tuning of Qwen-Image-Edit with merged QKV projections.

The public helpers are imported lazily so that `import fusedit` stays cheap (no torch/diffusers import).
"""

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


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fusedit' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
