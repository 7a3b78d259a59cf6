"""Download sizes: the file's bytes after gzip -9 and zstd -19, deterministic and honest."""
import gzip
import os

import zstandard

from deepshrink.formats.download import download_bytes


def test_download_bytes_are_the_compressed_sizes_and_decompress_back():
    payload = bytes(1000) + os.urandom(1000)
    sizes = download_bytes(payload)
    assert set(sizes) == {"gzip_bytes", "zstd_bytes"}
    assert 1000 < sizes["zstd_bytes"] < 1100 and 1000 < sizes["gzip_bytes"] < 1100   # zeros vanish, noise stays
    assert download_bytes(payload) == sizes   # no timestamp in the gzip header: the same file, the same figure
    assert zstandard.ZstdDecompressor().decompress(zstandard.ZstdCompressor(level=19).compress(payload)) == payload
    assert len(gzip.compress(payload, 9, mtime=0)) == sizes["gzip_bytes"]
