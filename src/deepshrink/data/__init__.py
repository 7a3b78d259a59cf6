"""Datasets as fixed, seeded train/val/test/calibration splits."""
from deepshrink.data.splits import DataSplits, from_datasets
from deepshrink.data.sources import DATASETS, load

__all__ = ["DataSplits", "from_datasets", "load", "DATASETS"]
