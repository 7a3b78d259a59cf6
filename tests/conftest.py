"""Shared fixtures. Datasets come from ../shared/data (never the network)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DEEPSHRINK_SHARED_DATA", REPO.parent / "shared" / "data"))


def pytest_configure(config):
    """Under pytest-xdist (``make test``: one worker per core) every worker computes on one thread,
    and so do the processes the tests start: two workers of two threads each on two cores mostly
    wait for each other."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "mnist").is_dir():
        pytest.fail(f"{SHARED_DATA}/mnist is missing: CI runs with ../shared beside the checkout")
    return SHARED_DATA


@pytest.fixture(scope="session")
def digits():
    from deepshrink.data import load

    return load("digits")


@pytest.fixture(scope="session")
def mnist(shared_data):
    from deepshrink.data import load

    return load("mnist", data_dir=shared_data / "mnist")


@pytest.fixture(scope="module")
def one_thread():
    """One thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``), as CI and the
    benchmarks run: on two shared cores, many small multi-threaded steps mostly wait for each other."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
