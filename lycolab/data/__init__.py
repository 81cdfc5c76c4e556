"""Datasets as sd-scripts defines them: folders, captions, buckets, batches."""

from lycolab.data.buckets import BucketChoice, BucketManager, make_bucket_resolutions
from lycolab.data.captions import process_caption
from lycolab.data.dataset import BucketedDataset
from lycolab.data.scan import discover_subsets, scan_subset

__all__ = [
    "BucketChoice",
    "BucketManager",
    "BucketedDataset",
    "discover_subsets",
    "make_bucket_resolutions",
    "process_caption",
    "scan_subset",
]
