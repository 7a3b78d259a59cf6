"""The seed example on a small MNIST subset: every step it promises, measured."""
import importlib.util
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "seed_example.py"


def load_example():
    spec = importlib.util.spec_from_file_location("seed_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_seed_example_on_a_subset(mnist, tmp_path):
    example = load_example()
    data = example.subset(mnist, train=3000, test=1000)
    results = example.run(data, tmp_path, epochs=2, finetune_epochs=1, latency_runs=3)
    assert results["fc1_kept"] == (100_352, 200_704)             # exactly half of fc1 (784 x 256)
    v = results["variants"]
    assert v["int8 .pte"]["nonzero_params"] <= 203_530 - 100_352   # the pruning is permanent
    simulated = v["simulated int8 (PyTorch)"]["accuracy"]
    assert simulated > 0.85                                      # 3,000 training images, 2 epochs
    assert abs(v["int8 .pte"]["accuracy"] - simulated) <= 0.005
    assert abs(v["int8 .onnx"]["accuracy"] - simulated) <= 0.005
    assert (tmp_path / "seed-mlp-int8.pte").stat().st_size < 0.3 * 4 * 203_530  # int8, not fp32
