"""A corpus of bad inputs other than artifact files: command-line flags, dataset directories,
output directories and the user's own code. Each ends as one ``deepshrink: error:`` line and exit
code 2 (through ``deepshrink.cli.main``), and the API raises exactly the error class given —
found when the input is read, never minutes later inside a stage."""
from __future__ import annotations

import gzip
import os
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from deepshrink.core.errors import ConfigError, DataError, DeepshrinkError, ModelLoadError
from deepshrink.data import load
from deepshrink.data.idx import FILES

from .conftest import cli, one_error_line

TRAIN_X, TRAIN_Y, TEST_X, TEST_Y = FILES


def idx_bytes(magic: int, shape: tuple[int, ...], payload: bytes | None = None) -> bytes:
    header = struct.pack(">II", magic, shape[0]) + b"".join(struct.pack(">I", d) for d in shape[1:])
    return header + (payload if payload is not None else bytes(int(np.prod(shape))))


def write_gz(path: Path, raw: bytes) -> None:
    with gzip.open(path, "wb") as handle:
        handle.write(raw)


def mnist_like(directory: Path, *, n_train: int = 40, n_test: int = 20, side: int = 28, labels=None) -> Path:
    """Four small, valid IDX files (zeros, labels 0..9) — the base every data case breaks."""
    directory.mkdir(parents=True, exist_ok=True)
    for images, labels_name, n in ((TRAIN_X, TRAIN_Y, n_train), (TEST_X, TEST_Y, n_test)):
        write_gz(directory / images, idx_bytes(2051, (n, side, side)))
        ys = bytes(i % 10 for i in range(n)) if labels is None else labels(n)
        write_gz(directory / labels_name, idx_bytes(2049, (n,), ys))
    return directory


def swap(a: str, b: str):
    def edit(d: Path) -> None:
        (d / a).rename(d / "tmp")
        (d / b).rename(d / a)
        (d / "tmp").rename(d / b)
    return edit


def overwrite(name: str, content: bytes | None = None, *, gz: bytes | None = None):
    def edit(d: Path) -> None:
        if gz is not None:
            write_gz(d / name, gz)
        else:
            (d / name).write_bytes(content)
    return edit


def truncated(name: str, keep: float):
    def edit(d: Path) -> None:
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[:int(len(data) * keep)])
    return edit


def flipped(name: str, offset: int):
    """One byte of the deflate stream changed (the gzip CRC or the stream itself breaks)."""
    def edit(d: Path) -> None:
        data = bytearray((d / name).read_bytes())
        data[offset] ^= 0x55
        (d / name).write_bytes(bytes(data))
    return edit


def gzip_bomb(name: str):
    """A 1 KB gzip whose header claims 20 M images: refused from the header, nothing inflated."""
    def edit(d: Path) -> None:
        write_gz(d / name, struct.pack(">IIII", 2051, 20_000_000, 28, 28) + bytes(100_000))
    return edit


# (id, edit of a valid directory, fragments of the message)
DATA_CASES = [
    ("images-labels-swapped", swap(TRAIN_X, TRAIN_Y), [TRAIN_X, "holds labels", "swapped"]),
    ("test-files-swapped", swap(TEST_X, TEST_Y), [TEST_X, "holds labels"]),
    ("not-gzip", overwrite(TRAIN_Y, b"plain text, not gzip"), [TRAIN_Y, "not a readable gzip IDX file"]),
    ("gzip-truncated", truncated(TEST_X, 0.5), [TEST_X, "not a readable gzip IDX file"]),
    ("deflate-corrupted", flipped(TEST_X, 40), [TEST_X, "not a readable gzip IDX file"]),
    ("empty-file", overwrite(TRAIN_X, b""), [TRAIN_X, "truncated"]),
    ("bad-magic", overwrite(TRAIN_X, gz=idx_bytes(2052, (4, 28, 28))), [TRAIN_X, "bad IDX magic 2052"]),
    ("payload-short", overwrite(TEST_X, gz=idx_bytes(2051, (20, 28, 28))[:-100]), [TEST_X, "payload has", "header says"]),
    ("payload-long", overwrite(TEST_Y, gz=idx_bytes(2049, (20,), bytes(25))), [TEST_Y, "more bytes"]),
    ("header-only", overwrite(TEST_X, gz=struct.pack(">II", 2051, 20)), [TEST_X, "image header is truncated"]),
    ("count-mismatch", overwrite(TEST_Y, gz=idx_bytes(2049, (19,), bytes(19))), [TEST_X, "20 images", "19 labels"]),
    ("wrong-image-size", overwrite(TEST_X, gz=idx_bytes(2051, (20, 32, 32))), [TEST_X, "images are 32x32", "28x28"]),
    ("label-out-of-range", overwrite(TRAIN_Y, gz=idx_bytes(2049, (40,), bytes([3] * 39 + [12]))),
     [TRAIN_Y, "label 12 at index 39", "outside the 10 classes"]),
    ("label-255", overwrite(TEST_Y, gz=idx_bytes(2049, (20,), bytes([255] * 20))), [TEST_Y, "label 255 at index 0"]),
    ("gzip-bomb-header", gzip_bomb(TRAIN_X), [TRAIN_X, "beyond any dataset"]),
    ("a-file-missing", lambda d: (d / TEST_Y).unlink(), ["IDX files not found", "missing t10k-labels"]),
]


@pytest.mark.parametrize("edit, fragments", [c[1:] for c in DATA_CASES], ids=[c[0] for c in DATA_CASES])
def test_a_bad_dataset_directory_is_found_when_read(edit, fragments, valid, tmp_path, capsys):
    directory = mnist_like(tmp_path / "mnist")
    edit(directory)
    code, lines = cli(capsys, "evaluate", valid["onnx"], "--data", "mnist", "--data-dir", directory, "--runs", "1")
    one_error_line(code, lines, *fragments)
    with pytest.raises(DeepshrinkError) as caught:
        load("mnist", data_dir=directory)
    assert type(caught.value) is DataError


def test_the_small_valid_directory_loads(tmp_path):
    data = load("mnist", data_dir=mnist_like(tmp_path / "mnist"))
    assert len(data.test) == 20


def test_the_real_data_still_loads(shared_data):
    data = load("fashion-mnist", data_dir=shared_data / "fashion-mnist")
    assert len(data.test) == 10_000 and len(data.train) + len(data.val) == 60_000


# (id, argv after 'evaluate MODEL' (MODEL: the valid .onnx) or a whole argv, fragments)
FLAG_CASES = [
    ("image-size-zero", ["--data", "digits", "--image-size", "0"], ["--image-size", "must be at least 1"]),
    ("image-size-negative", ["--data", "digits", "--image-size", "-3"], ["--image-size", "must be at least 1"]),
    ("image-size-text", ["--data", "digits", "--image-size", "big"], ["--image-size", "expected a whole number"]),
    ("threads-zero", ["--data", "digits", "--threads", "0"], ["--threads", "must be at least 1"]),
    ("runs-float", ["--data", "digits", "--runs", "2.5"], ["--runs", "expected a whole number"]),
    ("warmup-negative", ["--data", "digits", "--warmup", "-1"], ["--warmup", "must be at least 0"]),
    ("unknown-flag", ["--data", "digits", "--turbo"], ["unrecognized arguments: --turbo"]),
    ("data-missing", [], ["--data"]),
    ("unknown-dataset", ["--data", "cifar"], ["unknown dataset 'cifar'"]),
    ("data-dir-missing", ["--data", "mnist", "--data-dir", "/nonexistent/mnist"], ["IDX files not found", "/nonexistent/mnist"]),
    ("data-dir-a-file", "DATA_DIR_FILE", ["IDX files not found"]),
    ("mnist-image-size", ["--data", "mnist", "--data-dir", "/nonexistent", "--image-size", "14"],
     ["image_size 14 is not supported", "28x28"]),
    ("model-code-not-a-spec", ["--data", "digits", "--model-code", "nonsense"], ["is not path/to/file.py:NAME"]),
    ("model-file-missing", "MISSING", ["no such file"]),
    ("model-is-a-directory", "DIRECTORY", ["not a file"]),
    ("no-command", "NONE", ["the following arguments are required"]),
    ("quiet-and-verbose", ["--data", "digits", "-q", "-v"], ["not allowed with argument"]),
]


@pytest.mark.parametrize("args, fragments", [c[1:] for c in FLAG_CASES], ids=[c[0] for c in FLAG_CASES])
def test_a_bad_flag_is_one_line(args, fragments, valid, tmp_path, capsys):
    if args == "MISSING":
        argv = ["evaluate", tmp_path / "absent.pte", "--data", "digits"]
    elif args == "DIRECTORY":
        (tmp_path / "d.onnx").mkdir()
        argv = ["evaluate", tmp_path / "d.onnx", "--data", "digits"]
    elif args == "NONE":
        argv = []
    elif args == "DATA_DIR_FILE":
        (tmp_path / "mnist").write_text("not a directory")
        argv = ["evaluate", valid["onnx"], "--data", "mnist", "--data-dir", tmp_path / "mnist"]
    else:
        argv = ["evaluate", valid["onnx"], *args]
    code, lines = cli(capsys, *argv)
    one_error_line(code, lines, *fragments)


RECIPE = "name: t\nmodel: seed-mlp\nmodel_args: {hidden: [8]}\ndata: {name: digits}\nstages:\n  - train: {epochs: 1}\n"


def read_only(tmp_path: Path, monkeypatch) -> Path:
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    if os.geteuid() == 0:   # root writes into read-only directories: the kernel's answer for anyone else
        real = os.mkdir

        def refuse(path, *args, **kwargs):
            if Path(path).parent == d:
                raise PermissionError(13, "Permission denied", str(path))
            return real(path, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", refuse)
    return d / "out"


# (id, the --out path from tmp_path, fragments)
OUT_CASES = [
    ("out-is-a-file", lambda t, _: (t / "f.txt", (t / "f.txt").write_text("x"))[0], ["it is a file, not a directory"]),
    ("out-under-a-file", lambda t, _: (t / "f.txt", (t / "f.txt").write_text("x"))[0] / "sub",
     ["a part of that path is a file"]),
    ("out-under-dev-null", lambda t, _: Path("/dev/null/out"), ["a part of that path is a file"]),
    ("out-in-proc", lambda t, _: Path("/proc/deepshrink-out"), ["cannot create files there"]),
    ("out-in-sys", lambda t, _: Path("/sys/deepshrink-out"), ["/sys/deepshrink-out"]),
    ("out-read-only", read_only, ["permission denied"]),
]


@pytest.mark.parametrize("out, fragments", [c[1:] for c in OUT_CASES], ids=[c[0] for c in OUT_CASES])
def test_an_output_directory_that_cannot_be_written_is_refused_up_front(out, fragments, tmp_path, capsys, monkeypatch):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    target = out(tmp_path, monkeypatch)
    code, lines = cli(capsys, "run", recipe, "--out", target)
    one_error_line(code, lines, "output directory", *fragments)
    from deepshrink.pipeline import load_recipe, run_recipe

    with pytest.raises(DeepshrinkError) as caught:
        run_recipe(load_recipe(recipe), target)
    assert type(caught.value) is ConfigError


def test_a_permission_error_is_one_line(tmp_path, monkeypatch, capsys):
    """What a read-only directory does for a user who is not root."""
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    code, lines = cli(capsys, "run", recipe, "--out", tmp_path / "o")
    one_error_line(code, lines, "output directory", "permission denied")


MODEL_CODE = {
    "exits-on-import": "import sys\nsys.exit(4)\n",
    "exits-in-init": ("import sys\nfrom torch import nn\nclass Net(nn.Module):\n"
                      "    def __init__(self):\n        sys.exit(5)\n"),
    "exits-in-forward": ("import sys\nfrom torch import nn\nclass Net(nn.Module):\n"
                         "    def __init__(self):\n        super().__init__()\n        self.fc = nn.Linear(784, 10)\n"
                         "    def forward(self, x):\n        sys.exit(6)\n"),
    "shapes-do-not-fit": ("from torch import nn\nclass Net(nn.Module):\n"
                          "    def __init__(self):\n        super().__init__()\n        self.fc = nn.Linear(100, 10)\n"
                          "    def forward(self, x):\n        return self.fc(x.flatten(1))\n"),
    "forward-takes-two": ("from torch import nn\nclass Net(nn.Module):\n"
                          "    def __init__(self):\n        super().__init__()\n        self.fc = nn.Linear(784, 10)\n"
                          "    def forward(self, x, y):\n        return self.fc(x.flatten(1))\n"),
    "not-a-module": "class Net:\n    pass\n",
    "syntax-error": "class Net(:\n",
}
USER_CASES = [
    ("exits-on-import", ModelLoadError, ["importing", "SystemExit: 4"]),
    ("exits-in-init", ModelLoadError, ["Net(**{}) failed: SystemExit: 5"]),
    ("exits-in-forward", ModelLoadError, ["Net.forward called sys.exit(6)"]),
    ("shapes-do-not-fit", DataError, ["model and data do not fit", "mat1 and mat2 shapes cannot be multiplied"]),
    ("forward-takes-two", DataError, ["model and data do not fit", "TypeError"]),
    ("not-a-module", ModelLoadError, ["returned a Net, not an nn.Module"]),
    ("syntax-error", ModelLoadError, ["importing", "SyntaxError"]),
]


@pytest.mark.parametrize("name, error, fragments", USER_CASES, ids=[c[0] for c in USER_CASES])
def test_the_users_model_code_failing_is_one_line_before_any_stage(name, error, fragments, tmp_path, capsys):
    code_file = tmp_path / f"{name.replace('-', '_')}.py"
    code_file.write_text(MODEL_CODE[name])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: t\nmodel: '{code_file}:Net'\ndata: {{name: digits}}\nstages:\n  - train: {{epochs: 5}}\n")
    code, lines = cli(capsys, "run", recipe, "--out", tmp_path / "o")
    one_error_line(code, lines, *fragments)
    from deepshrink.pipeline import load_recipe, run_recipe

    with pytest.raises(DeepshrinkError) as caught:
        run_recipe(load_recipe(recipe), tmp_path / "o2")
    assert type(caught.value) is error
    assert not (tmp_path / "o2" / "state").exists() or not any((tmp_path / "o2" / "state").iterdir())


def test_a_user_metric_or_collate_calling_sys_exit_is_an_error(digits):
    import torch

    from deepshrink.data.splits import from_samples
    from deepshrink.evaluation.fidelity import fidelity

    outputs = [(torch.randn(4, 10),)]
    with pytest.raises(ConfigError, match=r"the user metric failed: SystemExit: 7"):
        fidelity(outputs, outputs, metric=lambda ref, out: sys.exit(7))
    with pytest.raises(ConfigError, match="not a number"):
        fidelity(outputs, outputs, metric=lambda ref, out: {"score": "high"})
    data = from_samples(calib=[torch.randn(3)] * 4, eval=[torch.randn(3)] * 4, collate=lambda items: sys.exit(8))
    with pytest.raises(DataError, match=r"data.collate: '<lambda>' failed on a batch of 4 samples: SystemExit: 8"):
        next(iter(data.loader("test")))
    with pytest.raises(DataError, match=r"labels\['eval'\]\[1\] is -1"):
        from_samples(calib=[torch.randn(3)] * 2, eval=[torch.randn(3)] * 2, labels={"eval": [0, -1], "calib": [0, 1]})


def test_sys_exit_anywhere_else_in_a_run_is_one_line_exit_1(tmp_path, capsys, monkeypatch):
    """Past every guarded call, the CLI still turns a SystemExit from user code into one line."""
    from deepshrink.pipeline import stages

    monkeypatch.setattr(stages, "check_fits", lambda model, ctx: sys.exit(9))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    code, lines = cli(capsys, "run", recipe, "--out", tmp_path / "o")
    assert code == 1 and len(lines) == 1 and lines[0].startswith("deepshrink: failed: your code called sys.exit(9)"), lines
