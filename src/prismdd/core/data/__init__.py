"""Datasets as uint8 splits plus a ``DatasetInfo``: one module per concern.

- ``base``: ``DatasetInfo``, ``TensorImages``, normalisation, once-per-process notices
- ``registry``: the dataset registry, the built-in loaders, ``load_dataset``/``load_splits``, ``check_data``
- ``decode``: one image file to uint8 (EXIF orientation, bit depth, transparency, resize and crop)
- ``imagefolder``: the ImageFolder scan, the header survey and its loader
- ``cache``: the memory-mapped decode cache, its lock and checksums
- ``sampling``: subsets, per-class indices, the random-real baseline, batches, class coverage

The names below are the package's API: import them from ``prismdd.core.data``.
"""
from .base import (IMAGENET_MEAN, IMAGENET_STD, DatasetInfo, TensorImages, channel_stats, denormalize, normalize,
                   pixel_bounds)
from .cache import CachedFolderImages, cache_root, decode_cache
from .decode import EVAL_CROPS, FolderImages, centre_crop, crop_ratio, load_image
from .registry import (DATASETS, FASHION_CLASSES, IDX_FILES, DatasetSpec, check_data, list_datasets, load_dataset,
                       load_splits, read_idx, write_idx)
from .sampling import (check_class_coverage, class_indices, iterate_batches, load_indices, random_real_indices,
                       subset_split)

__all__ = ["CachedFolderImages", "DATASETS", "DatasetInfo", "DatasetSpec", "EVAL_CROPS", "FASHION_CLASSES",
           "FolderImages", "IDX_FILES", "IMAGENET_MEAN", "IMAGENET_STD", "TensorImages", "cache_root", "centre_crop",
           "channel_stats", "check_class_coverage", "check_data", "class_indices", "crop_ratio", "decode_cache",
           "denormalize", "iterate_batches", "list_datasets", "load_dataset", "load_image", "load_indices",
           "load_splits", "normalize", "pixel_bounds", "random_real_indices", "read_idx", "subset_split",
           "write_idx"]
