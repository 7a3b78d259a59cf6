"""A corpus of bad artifact files: random bytes, truncated and bit-flipped copies, wrong metadata.

Each case corrupts a copy of a valid file and checks two faces of one refusal: ``deepshrink
evaluate FILE`` exits 2 with exactly one ``deepshrink: error:`` line naming the file and the fault
(no runtime log lines, no traceback), and ``deepshrink.evaluate`` raises exactly the error class
given. Loading goes through the child-process probe for ``.pte`` / ``.onnx`` (``isolate=True``).
"""
from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import pytest
import torch

from deepshrink.core.errors import ArtifactError, DataError, DeepshrinkError, ModelLoadError
from deepshrink.evaluation import evaluate

from .conftest import cli, copy_of, one_error_line


def random_bytes(n: int):
    def mutate(path: Path) -> None:
        path.write_bytes(os.urandom(n) if n else b"")
    return mutate


def truncate(fraction: float | None = None, *, keep: int | None = None):
    def mutate(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(data[:keep if keep is not None else int(len(data) * fraction)])
    return mutate


def text(content: str):
    def mutate(path: Path) -> None:
        path.write_text(content)
    return mutate


def poke(offset: int, value: bytes):
    """Overwrite bytes at ``offset`` (negative: from the end)."""
    def mutate(path: Path) -> None:
        data = bytearray(path.read_bytes())
        start = offset % len(data)
        data[start:start + len(value)] = value
        path.write_bytes(bytes(data))
    return mutate


def replace(old: bytes, new: bytes):
    def mutate(path: Path) -> None:
        data = path.read_bytes()
        assert old in data
        path.write_bytes(data.replace(old, new, 1))
    return mutate


def pte_header(field: str, value: int):
    """Set one extended-header field of a .pte (u64 at 16 program size, 24 segment base, 32 segment size)."""
    offsets = {"program_size": 16, "segment_base": 24, "segment_size": 32}

    def mutate(path: Path) -> None:
        data = bytearray(path.read_bytes())
        struct.pack_into("<Q", data, offsets[field], value)
        path.write_bytes(bytes(data))
    return mutate


def safetensors_with(header: dict | list | bytes, payload: bytes = b""):
    """A hand-made safetensors file: 8-byte little-endian header length, JSON header, payload."""
    def mutate(path: Path) -> None:
        raw = header if isinstance(header, bytes) else json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + payload)
    return mutate


def checkpoint_meta(meta):
    """The valid checkpoint's tensors with ``meta`` as its deepshrink metadata (a string is stored as is)."""
    def mutate(path: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(path))
        save_file(tensors, str(path), metadata={"deepshrink": meta if isinstance(meta, str) else json.dumps(meta)})
    return mutate


def checkpoint_tensors(edit):
    def mutate(path: Path) -> None:
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
        tensors = load_file(str(path))
        edit(tensors)
        save_file(tensors, str(path), metadata=metadata)
    return mutate


def dsk_with(header: dict, payload: bytes = b"", *, keep_crc: bool = True):
    """A hand-made .dsk: preamble, plain JSON header, payload and (a correct) CRC32."""
    def mutate(path: Path) -> None:
        from deepshrink.formats import container as C

        raw = json.dumps(header).encode()
        body = C._PREAMBLE.pack(C.MAGIC, C.VERSION, 0, len(raw), len(payload)) + raw + payload
        path.write_bytes(body + C._CRC.pack(zlib.crc32(body) if keep_crc else 0))
    return mutate


def dsk_meta(edit):
    """The valid .dsk re-encoded with its metadata edited (so checksums stay right)."""
    def mutate(path: Path) -> None:
        from deepshrink.formats.container import read_container, write_container

        tensors, meta = read_container(path)
        write_container(path, tensors, edit(meta))
    return mutate


def sidecar(content):
    """Replace the artifact's ``.json`` sidecar (a dict edits the valid one; bytes/str are written as is)."""
    def mutate(path: Path) -> None:
        side = path.with_name(path.name + ".json")
        if isinstance(content, dict):
            info = json.loads(side.read_text()) if side.is_file() else {}
            info.update(content)
            side.write_text(json.dumps(info))
        else:
            side.write_text(content) if isinstance(content, str) else side.write_bytes(content)
    return mutate


BOMB = {"records": [{"name": "hidden.0.weight", "shape": [2**28], "dtype": "float32", "kind": "codebook",
                     "codebook_size": 1, "streams": [["codebook", 4], ["indices", 3]]}],
        "metadata": {"arch": {"zoo": "seed-mlp", "kwargs": {}}}}

NOT_PTE = "ExecuTorch could not load this program"
NOT_ONNX = "ONNX Runtime could not load this model"

# (id, valid kind copied, file name or None, mutation, error class from evaluate(), fragments of the one line)
CASES = [
    # .pte: plainly not a program: refused from the bytes before the runtime sees them
    ("pte-empty", "pte", None, random_bytes(0), ArtifactError, [NOT_PTE, "has 0 bytes"]),
    ("pte-7-random-bytes", "pte", None, random_bytes(7), ArtifactError, [NOT_PTE, "fewer than a program's headers"]),
    ("pte-random-5000", "pte", None, random_bytes(5000), ArtifactError, [NOT_PTE, "not an ExecuTorch program"]),
    ("pte-random-200k", "pte", None, random_bytes(200_000), ArtifactError, [NOT_PTE, "not an ExecuTorch program"]),
    ("pte-text", "pte", None, text("hello, I am a text file\n" * 10), ArtifactError, [NOT_PTE, "not an ExecuTorch program"]),
    ("pte-an-onnx-renamed", "onnx", "model.pte", lambda p: None, ArtifactError, [NOT_PTE, "not an ExecuTorch program"]),
    ("pte-other-format-version", "pte", None, poke(4, b"ET13"), ArtifactError, [NOT_PTE, "program format b'ET13'"]),
    ("pte-truncated-header", "pte", None, truncate(keep=20), ArtifactError, [NOT_PTE, "fewer than a program's headers"]),
    ("pte-truncated-in-program", "pte", None, truncate(keep=700), ArtifactError, [NOT_PTE, "truncated"]),
    ("pte-truncated-in-segments", "pte", None, truncate(0.5), ArtifactError, [NOT_PTE, "truncated"]),
    ("pte-truncated-last-byte", "pte", None, truncate(keep=-1), ArtifactError, [NOT_PTE, "truncated"]),
    ("pte-bad-extended-header", "pte", None, poke(8, b"XX00"), ArtifactError, [NOT_PTE, "extended header"]),
    ("pte-program-size-past-end", "pte", None, pte_header("program_size", 2**40), ArtifactError, [NOT_PTE, "truncated"]),
    ("pte-segments-past-end", "pte", None, pte_header("segment_size", 2**33), ArtifactError, [NOT_PTE, "truncated"]),
    ("pte-segment-base-outside", "pte", None, pte_header("segment_base", 8), ArtifactError, [NOT_PTE, "segments start"]),
    ("pte-root-offset-outside", "pte", None, poke(0, struct.pack("<I", 2**31)), ArtifactError, [NOT_PTE, "root table"]),
    ("pte-vtable-garbage", "pte", None, poke(48, b"\xff" * 8), ArtifactError, [NOT_PTE]),
    ("pte-backend-name-not-text", "pte", None, replace(b"XnnpackBackend", b"Xnnpack\xff\xfeckend"), ArtifactError,
     [NOT_PTE, "not text"]),
    ("pte-method-renamed", "pte", None, replace(b"forward", b"fxrward"), ArtifactError, [NOT_PTE, "forward"]),
    # .onnx
    ("onnx-empty", "onnx", None, random_bytes(0), ArtifactError, [NOT_ONNX]),
    ("onnx-random-5000", "onnx", None, random_bytes(5000), ArtifactError, [NOT_ONNX, "not an ONNX model"]),
    ("onnx-text", "onnx", None, text("ir_version: 8\n"), ArtifactError, [NOT_ONNX]),
    ("onnx-truncated-half", "onnx", None, truncate(0.5), ArtifactError, [NOT_ONNX]),
    ("onnx-truncated-last-byte", "onnx", None, truncate(keep=-1), ArtifactError, [NOT_ONNX]),
    ("onnx-a-pte-renamed", "pte", "model.onnx", lambda p: None, ArtifactError, [NOT_ONNX]),
    ("onnx-unknown-operator", "onnx", None, replace(b"Gemm", b"Gexx"), ArtifactError, [NOT_ONNX, "Gexx"]),
    # .safetensors checkpoints (loading wraps the file's fault in a ModelLoadError naming the model)
    ("safetensors-empty", "safetensors", None, random_bytes(0), ModelLoadError, ["not a readable safetensors checkpoint"]),
    ("safetensors-random", "safetensors", None, random_bytes(5000), ModelLoadError, ["not a readable safetensors checkpoint"]),
    ("safetensors-truncated", "safetensors", None, truncate(0.5), ModelLoadError, ["not a readable safetensors checkpoint"]),
    ("safetensors-header-longer-than-file", "safetensors", None, poke(0, struct.pack("<Q", 10**6)), ModelLoadError,
     ["not a readable safetensors checkpoint"]),
    ("safetensors-header-a-list", "safetensors", None, safetensors_with([1, 2]), ModelLoadError,
     ["not a readable safetensors checkpoint"]),
    ("safetensors-header-not-json", "safetensors", None, safetensors_with(b"{not json"), ModelLoadError,
     ["not a readable safetensors checkpoint"]),
    ("safetensors-offsets-past-payload", "safetensors", None,
     safetensors_with({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}, b"\0" * 16), ModelLoadError,
     ["not a readable safetensors checkpoint"]),
    ("safetensors-unknown-dtype", "safetensors", None,
     safetensors_with({"w": {"dtype": "Q9", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16), ModelLoadError,
     ["not a readable safetensors checkpoint"]),
    ("safetensors-shape-vs-bytes", "safetensors", None,
     safetensors_with({"w": {"dtype": "F32", "shape": [5], "data_offsets": [0, 16]}}, b"\0" * 16), ModelLoadError,
     ["not a readable safetensors checkpoint"]),
    ("safetensors-no-metadata", "safetensors", None,
     safetensors_with({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16), ModelLoadError,
     ["has no 'deepshrink' metadata"]),
    ("safetensors-meta-not-json", "safetensors", None, checkpoint_meta("{arch"), ModelLoadError, ["is not valid JSON"]),
    ("safetensors-meta-a-list", "safetensors", None, checkpoint_meta([1, 2]), ModelLoadError,
     ["'deepshrink' must be a JSON object, got a list"]),
    ("safetensors-meta-a-string", "safetensors", None, checkpoint_meta("\"lenet\""), ModelLoadError,
     ["'deepshrink' must be a JSON object, got a str"]),
    ("safetensors-arch-a-list", "safetensors", None, checkpoint_meta({"arch": ["zoo"]}), ModelLoadError,
     ["'deepshrink.arch' must be an object"]),
    ("safetensors-arch-empty", "safetensors", None, checkpoint_meta({"arch": {}}), ModelLoadError,
     ["does not say how to rebuild its architecture"]),
    ("safetensors-zoo-unknown", "safetensors", None, checkpoint_meta({"arch": {"zoo": "resnet-9000"}}), ModelLoadError,
     ["unknown model 'resnet-9000'"]),
    ("safetensors-zoo-not-a-name", "safetensors", None, checkpoint_meta({"arch": {"zoo": [1]}}), ModelLoadError,
     ["zoo model name of the wrong type"]),
    ("safetensors-kwargs-a-list", "safetensors", None, checkpoint_meta({"arch": {"zoo": "seed-mlp", "kwargs": [8]}}),
     ModelLoadError, ["arguments of the wrong type"]),
    ("safetensors-kwargs-unknown", "safetensors", None,
     checkpoint_meta({"arch": {"zoo": "seed-mlp", "kwargs": {"colour": "red"}}}), ModelLoadError, ["bad arguments"]),
    ("safetensors-kwargs-negative", "safetensors", None,
     checkpoint_meta({"arch": {"zoo": "seed-mlp", "kwargs": {"hidden": [-5]}}}), ModelLoadError, ["bad arguments"]),
    # a model of 10^12 parameters is never built: the skeleton is checked on the meta device first
    ("safetensors-kwargs-huge", "safetensors", None,
     checkpoint_meta({"arch": {"zoo": "seed-mlp", "kwargs": {"hidden": [10**12]}}}), ModelLoadError,
     ["do not fit", "'hidden.0.weight' is [8, 784] in the file"]),
    ("safetensors-weight-missing", "safetensors", None, checkpoint_tensors(lambda t: t.pop("hidden.0.bias")), ModelLoadError,
     ["do not fit", "missing 'hidden.0.bias'"]),
    ("safetensors-weight-wrong-shape", "safetensors", None,
     checkpoint_tensors(lambda t: t.__setitem__("hidden.0.bias", torch.zeros(9))), ModelLoadError,
     ["'hidden.0.bias' is [9] in the file"]),
    ("safetensors-users-code-not-named", "safetensors", None,
     checkpoint_meta({"arch": {"file": "/elsewhere/evil.py", "class": "Evil"}}), ModelLoadError,
     ["name the file yourself", "--model-code"]),
    # .dsk containers
    ("dsk-empty", "dsk", None, random_bytes(0), ModelLoadError, ["not a .dsk file"]),
    ("dsk-random", "dsk", None, random_bytes(5000), ModelLoadError, ["not a .dsk file"]),
    ("dsk-truncated", "dsk", None, truncate(0.5), ModelLoadError, ["truncated"]),
    ("dsk-checksum", "dsk", None, poke(-100, b"\x00\x01\x02"), ModelLoadError, ["checksum mismatch"]),
    ("dsk-bytes-appended", "dsk", None, lambda p: p.write_bytes(p.read_bytes() + b"xx"), ModelLoadError,
     ["unexpected bytes after the checksum"]),
    ("dsk-version", "dsk", None, poke(8, b"\x07\x00"), ModelLoadError, ["unsupported .dsk format version 7"]),
    ("dsk-header-not-json", "dsk", None, dsk_with({"records": "nope", "metadata": {}}), ModelLoadError,
     ["'records' list"]),
    ("dsk-1GiB-from-190-bytes", "dsk", None, dsk_with(BOMB, struct.pack("<f", 0.5) + struct.pack("<BH", 0, 0)),
     ModelLoadError, ["claim 1073741824 bytes", "more than this file can honestly hold"]),
    ("dsk-arch-missing", "dsk", None, dsk_meta(lambda m: {}), ModelLoadError, ["does not say how to rebuild"]),
    ("dsk-arch-a-string", "dsk", None, dsk_meta(lambda m: {"arch": "seed-mlp"}), ModelLoadError,
     ["records its architecture as a str"]),
    ("dsk-kwargs-huge", "dsk", None, dsk_meta(lambda m: {"arch": {"zoo": "seed-mlp", "kwargs": {"hidden": [10**11]}}}),
     ModelLoadError, ["do not fit"]),
    ("dsk-format-unknown-weights", "dsk", None,
     dsk_meta(lambda m: {**m, "format": "deepshrink.lowbit", "weights": [1]}), ModelLoadError,
     ["'weights' must be an object"]),
    ("dsk-format-a-list", "dsk", None, dsk_meta(lambda m: {**m, "format": ["deepshrink.lowbit"]}), ModelLoadError,
     ["metadata 'format' [\"deepshrink.lowbit\"] is not a .dsk layout"]),
    ("dsk-format-unknown", "dsk", None, dsk_meta(lambda m: {**m, "format": "deepshrink.future"}), ModelLoadError,
     ["metadata 'format' \"deepshrink.future\" is not a .dsk layout", "upgrade deepshrink"]),
    # .pt2 programs
    ("pt2-random", "pt2", None, random_bytes(3000), ModelLoadError, ["not a .pt2 archive (not a zip file)"]),
    ("pt2-truncated", "pt2", None, truncate(0.5), ModelLoadError, ["not a .pt2 archive"]),
    ("pt2-empty", "pt2", None, random_bytes(0), ModelLoadError, ["not a .pt2 archive"]),
    # sidecars (<artifact>.json) of the wrong shape
    ("sidecar-not-json", "pte", None, sidecar("{params: 3"), ArtifactError, ["linear.pte.json", "not a readable sidecar"]),
    ("sidecar-a-list", "pte", None, sidecar("[1, 2, 3]"), ArtifactError, ["linear.pte.json", "this one is a list"]),
    ("sidecar-null", "pte", None, sidecar("null"), ArtifactError, ["this one is a null"]),
    ("sidecar-binary", "pte", None, sidecar(b"\xff\xfe\x00garbage"), ArtifactError, ["not a readable sidecar"]),
    ("sidecar-params-a-string", "pte", None, sidecar({"params": "many"}), ArtifactError, ["'params' must be a parameter count"]),
    ("sidecar-macs-negative", "pte", None, sidecar({"macs": -1}), ArtifactError, ["'macs' must be a MAC count"]),
    ("sidecar-parity-a-dict", "onnx", None, sidecar({"parity": {"runtime": "x"}}), ArtifactError,
     ["linear.onnx.json", "'parity' must be a list of parity checks"]),
    ("sidecar-parity-entry-wrong", "pte", None, sidecar({"parity": [{"runtime": 3, "max_abs_diff": "big"}]}),
     ArtifactError, ["'parity' must be a list of parity checks"]),
    ("sidecar-sparse-compute-a-string", "dsk", None, sidecar({"sparse_compute": "yes"}), ArtifactError,
     ["mlp.dsk.json", "'sparse_compute' must be a list"]),
    ("sidecar-sparse-compute-no-flag", "dsk", None, sidecar({"sparse_compute": [{"layer": "hidden.0"}]}), ArtifactError,
     ["'sparse_compute' must be a list of {layer: str, runs_sparse: bool}"]),
    ("sidecar-sparse-compute-unknown-layer", "dsk", None,
     sidecar({"sparse_compute": [{"layer": "no.such.layer", "runs_sparse": True}]}), ArtifactError,
     ["names layer 'no.such.layer'", "not a Linear layer"]),
    ("sidecar-delegation-wrong", "pte", None, sidecar({"delegation": {"outside_delegate": {"aten.add": "x"}}}),
     ArtifactError, ["'delegation' must be"]),
    # files that are no supported format at all: the reason given is that, not pickle
    ("suffix-tflite", "pte", "model.tflite", lambda p: None, ArtifactError,
     [".tflite files are not a format deepshrink reads", ".pte (ExecuTorch), .onnx (ONNX Runtime)"]),
    ("suffix-bin", "pte", "model.bin", lambda p: None, ArtifactError, [".bin files are not a format deepshrink reads"]),
    ("suffix-txt", "pte", "notes.txt", text("weights?"), ArtifactError, [".txt files are not a format"]),
    ("suffix-none", "pte", "model", lambda p: None, ArtifactError, ["a file without a suffix"]),
    ("suffix-pickle", "pte", "model.pt", lambda p: None, ArtifactError,
     ["pickle runs code", "save_checkpoint (.safetensors)"]),
]


@pytest.mark.parametrize("kind, name, mutate, error, fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_artifact_is_one_line_and_exit_2(kind, name, mutate, error, fragments, valid, digits, tmp_path, capsys):
    path = copy_of(valid, kind, tmp_path, name)
    mutate(path)
    code, lines = cli(capsys, "evaluate", path, "--data", "digits", "--runs", "1", "--warmup", "0")
    one_error_line(code, lines, path.name, *fragments)
    with pytest.raises(DeepshrinkError) as caught:
        evaluate(path, digits.test, latency_runs=0)
    assert type(caught.value) is error, caught.value
    assert "\n" not in str(caught.value)


def test_the_corpus_files_are_valid_before_they_are_corrupted(valid, digits, capsys):
    for kind in ("pte", "onnx", "safetensors", "dsk", "pt2"):
        code, lines = cli(capsys, "evaluate", valid[kind], "--data", "digits", "--runs", "1", "--warmup", "0")
        assert code == 0, lines
        metrics = evaluate(valid[kind], digits.test, latency_runs=0)
        assert metrics.test_samples == len(digits.test)


def test_a_static_batch_program_runs_every_batch_in_chunks(valid, digits):
    """The .pt2 was exported at batch 1: its guards would fail on 256; it is fed one sample a call."""
    static = evaluate(valid["pt2"], digits.test, latency_runs=0)
    dynamic = evaluate(valid["onnx"], digits.test, latency_runs=0)   # the same weights, any batch
    assert static.accuracy == dynamic.accuracy and static.test_samples == len(digits.test)


IMAGE_SIZE = [
    ("pte", DataError, ["input 0 has shape [256, 1, 14, 14]", "exported for [1024, 1, 28, 28]", "dim 2 is 14, expected 28"]),
    ("onnx", DataError, ["input 0 ('input') has shape [256, 1, 14, 14]", "takes [?, 1, 28, 28]", "dim 2 is 14"]),
    ("pt2", DataError, ["input 0 has shape [1, 1, 14, 14]", "takes [1, 1, 28, 28]", "dim 2 is 14, expected 28"]),
    ("safetensors", DataError, ["model and data do not fit", "MLP cannot run a batch of [256, 1, 14, 14]",
                                "mat1 and mat2 shapes cannot be multiplied"]),
]


@pytest.mark.parametrize("kind, error, fragments", IMAGE_SIZE, ids=[c[0] for c in IMAGE_SIZE])
def test_inputs_of_the_wrong_shape_name_the_input_and_dimension(kind, error, fragments, valid, capsys):
    code, lines = cli(capsys, "evaluate", valid[kind], "--data", "digits", "--image-size", "14", "--runs", "1",
                      "--warmup", "0")
    one_error_line(code, lines, valid[kind].name, *fragments, "--image-size")


def test_a_pte_whose_extended_header_runs_past_the_file_is_refused():
    import struct

    from deepshrink.core.errors import ArtifactError
    from deepshrink.evaluation.verify import check_pte

    # root offset, "ET12", then "eh00" with a length of 32: the header's optional field lies beyond byte 32
    data = struct.pack("<I", 16) + b"ET12" + b"eh00" + struct.pack("<IQQ", 32, 32, 0)
    assert len(data) == 32
    with pytest.raises(ArtifactError, match="truncated: its extended header claims 32 bytes, the file has 32"):
        check_pte(data, "short.pte")
