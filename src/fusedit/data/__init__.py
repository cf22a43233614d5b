"""Training data: metadata file -> validated, bucketed image/edit-image/prompt batches.

records (CSV/JSONL parsing) -> validation (every row checked before training) -> images (decode, orient, resize)
-> dataset + buckets (same-shape batches, resumable order) -> datamodule (the LightningDataModule).
"""

from fusedit.data.buckets import BucketBatchSampler
from fusedit.data.datamodule import EditDataModule, split_train_val
from fusedit.data.errors import DataValidationError, MetadataError
from fusedit.data.sample import make_sample_dataset

__all__ = [
    "BucketBatchSampler",
    "DataValidationError",
    "EditDataModule",
    "MetadataError",
    "make_sample_dataset",
    "split_train_val",
]
