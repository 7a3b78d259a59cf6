"""What a file costs to download: its bytes after the compression a store or an update applies.

App stores and OTA updates ship compressed payloads (an APK is a zip, i.e. deflate; Play's and
most OTA pipelines use zstd or brotli), so a file of random-looking int8 bytes and one of
repeated zeros of the same size cost very different downloads. Both figures are measured on the
file's own bytes, at each compressor's highest standard level.
"""
from __future__ import annotations

import gzip

import zstandard

GZIP_LEVEL = 9
ZSTD_LEVEL = 19   # zstd's highest level without --ultra, what packaging tools use for release payloads


def download_bytes(payload: bytes) -> dict[str, int]:
    """``{"gzip_bytes": ..., "zstd_bytes": ...}``: ``payload``'s size after ``gzip -9`` and ``zstd -19``."""
    return {
        "gzip_bytes": len(gzip.compress(payload, GZIP_LEVEL, mtime=0)),
        "zstd_bytes": len(zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(payload)),
    }
