"""Datasets as fixed, seeded train/val/test/calibration splits."""
from deepshrink.data.splits import NO_LABEL, DataSplits, SampleSet, from_datasets, from_samples
from deepshrink.data.sources import DATASETS, load

__all__ = ["DataSplits", "SampleSet", "from_datasets", "from_samples", "load", "DATASETS", "NO_LABEL"]
