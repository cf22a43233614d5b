"""The merged-QKV Qwen-Image transformer and its loading."""

from fusedit.model.loading import load_transformer
from fusedit.model.merged_qkv import MergedQKVAttnProcessor, fuse_qkv, is_merged, unfuse_qkv

__all__ = ["MergedQKVAttnProcessor", "fuse_qkv", "is_merged", "load_transformer", "unfuse_qkv"]
