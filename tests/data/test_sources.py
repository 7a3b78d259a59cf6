import gzip
import struct

import pytest
import torch

from deepshrink.core.errors import DataError
from deepshrink.data import from_datasets, load
from deepshrink.data.idx import FILES, locate, md5_of, read_idx


def test_digits_splits_are_fixed_and_disjoint(digits):
    assert digits.sizes() == {"train": 1294, "val": 144, "test": 359, "calib": 256}
    assert digits.input_shape == (1, 28, 28)
    again = load("digits")
    assert torch.equal(digits.test.tensors[0], again.test.tensors[0])
    assert torch.equal(digits.train.tensors[1], again.train.tensors[1])
    # no test image appears in train (rows compared exactly)
    train = digits.train.tensors[0].flatten(1)
    test = digits.test.tensors[0].flatten(1)
    assert not (torch.cdist(test, train).min(dim=1).values == 0).any()


def test_digits_native_size():
    assert load("digits", image_size=8).input_shape == (1, 8, 8)


def test_mnist_reads_official_files(mnist, shared_data):
    assert mnist.sizes() == {"train": 55000, "val": 5000, "test": 10000, "calib": 512}
    counts = torch.bincount(mnist.test.tensors[1], minlength=10).tolist()
    assert counts == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]  # the README's test label counts
    assert md5_of(shared_data / "mnist" / "t10k-labels-idx1-ubyte.gz") == "ec29112dd5afa0611ce80d1b7f02629c"
    images = read_idx(shared_data / "mnist" / "t10k-images-idx3-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype.name == "uint8"


def test_fashion_mnist_reads(shared_data):
    fm = load("fashion-mnist", data_dir=shared_data / "fashion-mnist")
    assert fm.sizes() == {"train": 55000, "val": 5000, "test": 10000, "calib": 512}
    assert torch.bincount(fm.test.tensors[1]).tolist() == [1000] * 10
    # pixels scaled to [0, 1], then standardised with Fashion-MNIST's own training mean and std
    raw = torch.from_numpy(read_idx(shared_data / "fashion-mnist" / "t10k-images-idx3-ubyte.gz")[:100].astype("float32"))
    torch.testing.assert_close(fm.test.tensors[0][:100, 0], (raw / 255 - 0.2860) / 0.3530, rtol=0, atol=1e-5)
    train = torch.cat([fm.train.tensors[0], fm.val.tensors[0]])
    assert abs(float(train.mean())) < 0.01 and abs(float(train.std()) - 1) < 0.01


def test_missing_data_dir_names_the_fix(tmp_path):
    with pytest.raises(DataError, match=r"mnist: IDX files not found \(looked in .*nowhere.*--data-dir"):
        load("mnist", data_dir=tmp_path / "nowhere")
    with pytest.raises(DataError) as err:
        load("mnist", data_dir=tmp_path / "nowhere")
    # a Python caller is told the Python argument first; the CLI flag is named for the command line
    assert "data_dir=DIR (CLI: --data-dir DIR)" in str(err.value) and "download=True" in str(err.value)


def test_env_var_is_searched(tmp_path, monkeypatch, shared_data):
    monkeypatch.setenv("DEEPSHRINK_DATA", str(shared_data))
    assert locate("mnist") == shared_data / "mnist"


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset 'cifar'; choose one of digits, mnist, fashion-mnist"):
        load("cifar")


def test_corrupt_idx_is_a_data_error(tmp_path):
    for name in FILES:
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(struct.pack(">II", 1234, 0))
    with pytest.raises(DataError, match="bad IDX magic 1234"):
        load("mnist", data_dir=tmp_path)
    (tmp_path / FILES[0]).write_bytes(b"not gzip")
    with pytest.raises(DataError, match="not a readable gzip IDX file"):
        read_idx(tmp_path / FILES[0])


def test_bring_your_own_dataset():
    from torch.utils.data import TensorDataset

    x, y = torch.randn(100, 1, 4, 4), torch.arange(100) % 3
    splits = from_datasets(TensorDataset(x, y), TensorDataset(x[:10], y[:10]), calib_size=16)
    assert splits.sizes() == {"train": 90, "val": 10, "test": 10, "calib": 16}
    assert splits.num_classes == 3 and splits.input_shape == (1, 4, 4)
