"""Compressed tensors and the on-disk ``.dsk`` container. Imports ops and core."""
