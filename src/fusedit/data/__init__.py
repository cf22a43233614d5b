"""Training data: metadata file -> validated, bucketed image/edit-image/prompt batches.

records (CSV/JSONL parsing) -> validation (every row checked before training) -> images (decode, orient, resize)
-> dataset + buckets (same-shape batches, resumable order) -> datamodule (the LightningDataModule).
"""

from fusedit._lazy import lazy_getattr

# Imported on first use: reading a metadata file (inference's preflight) must not load Lightning.
_EXPORTS = {
    "BucketBatchSampler": "fusedit.data.buckets",
    "DataValidationError": "fusedit.data.errors",
    "EditDataModule": "fusedit.data.datamodule",
    "default_metadata": "fusedit.data.sample",
    "MetadataError": "fusedit.data.errors",
    "make_sample_dataset": "fusedit.data.sample",
    "split_train_val": "fusedit.data.datamodule",
}

__getattr__ = lazy_getattr(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
