"""Training on several processes (torchrun, DDP over gloo on the loopback, a free port): two
processes train to the weights of one, rank 0 alone writes, a killed rank is named in one line and
``--resume`` finishes the run to the weights of a run never interrupted."""
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from deepshrink.cli import main
from deepshrink.core.errors import ConfigError
from deepshrink.pipeline import parse_recipe
from deepshrink.pipeline.recipe_checks import stage_trains
from deepshrink.training import distributed

# one-shot prune between two trainings: rank 0 alone prunes, rank 1 gets the masked state broadcast
RECIPE = """\
name: ddp
model: lenet-300-100
data: {name: digits}
stages:
  - train: {epochs: 1, batch_size: 64}
  - prune: {method: magnitude, sparsity: 0.5}
  - finetune: {epochs: 2, batch_size: 16}
  - evaluate: {latency_runs: 0, warmup: 0}
"""
# 1 vs 2 processes: the same global batches in the same order, gradients averaged; only the sums'
# order differs (measured: max |dw| ~1e-5 after the 4 epochs)
WEIGHT_TOLERANCE = 1e-4
TIMEOUT = 300


def _deepshrink(cwd: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "deepshrink", *args], cwd=cwd, env=env or os.environ.copy(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=TIMEOUT)
    return process.returncode, out, err


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("deepshrink: ")]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    state = json.loads((out / "state" / "state.json").read_text())
    return load_file(out / "state" / state["generation"] / state["model_file"])


def _files(out: Path) -> list[str]:
    """Every file the run left, the generation folder's random suffix left out."""
    names = []
    for path in sorted(out.rglob("*")):
        if path.is_file():
            parts = path.relative_to(out).parts
            names.append("/".join("gen-*" if p.startswith("gen-") else p for p in parts))
    return names


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("ddp")
    (directory / "ddp.yaml").write_text(RECIPE)
    return directory


@pytest.fixture(scope="module")
def two_processes(workdir) -> Path:
    code, _, err = _finish(_deepshrink(workdir, "run", "ddp.yaml", "--out", "two", "--nproc-per-node", "2"))
    assert code == 0, err[-3000:]
    return workdir / "two"


def test_two_processes_train_to_the_weights_of_one(workdir, two_processes):
    # the reference under torchrun itself: `deepshrink run` started by it works as well as --nproc-per-node
    # (1 thread, as each of the 2 processes has: small batches on 2 busy cores crawl with 2 threads)
    code, _, err = _finish(subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m", "deepshrink",
         "run", "ddp.yaml", "--out", "one"], cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"}))
    assert code == 0, err[-3000:]
    one, two = _weights(workdir / "one"), _weights(two_processes)
    assert one.keys() == two.keys()
    worst = max(float((one[k] - two[k]).abs().max()) for k in one)
    assert worst <= WEIGHT_TOLERANCE, f"max |w1 - w2| = {worst:.3g}"
    # the masks held on both ranks: the same weights are exactly zero, half of the hidden layers'
    # (global magnitude; the classifier is left dense)
    for name in one:
        assert torch.equal(one[name] == 0, two[name] == 0), name
    pruned = ("hidden.0.weight", "hidden.1.weight")
    zeros = sum(int((two[n] == 0).sum()) for n in pruned) / sum(two[n].numel() for n in pruned)
    assert abs(zeros - 0.5) < 0.001
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (workdir / "one", two_processes))
    assert m1["environment"]["world_size"] == 1 and m2["environment"]["world_size"] == 2
    assert [s.get("training", {}).get("world_size") for s in m2["stages"]] == [2, None, 2, None]
    for label, variant in m2["variants"].items():   # 1 test sample is 0.28 pt
        assert abs(variant["accuracy"] - m1["variants"][label]["accuracy"]) <= 1 / 359 + 1e-9, label
    assert m2["variants"]["compressed eager"]["accuracy"] > 0.85
    # one set of artifacts, nothing half-written, nothing more than the 1-process run writes
    assert _files(two_processes) == _files(workdir / "one")
    assert sorted(p.name for p in workdir.iterdir()) == ["ddp.yaml", "one", "two"]
    assert not any(".tmp-" in name for name in _files(two_processes))


def _rank_pid(tag: str, rank: int) -> int | None:
    for entry in Path("/proc").iterdir():
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"DEEPSHRINK_TEST_TAG={tag}".encode() in env and f"RANK={rank}".encode() in env:
            return int(entry.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process through /proc")
def test_a_killed_rank_is_named_and_resume_finishes_the_run(workdir, two_processes):
    tag = uuid.uuid4().hex
    run = ("run", "ddp.yaml", "--out", "killed", "--nproc-per-node", "2")
    process = _deepshrink(workdir, *run, env={**os.environ, "DEEPSHRINK_TEST_TAG": tag})
    epoch_file = workdir / "killed" / "state" / "finetune-epoch.pt"
    deadline = time.monotonic() + TIMEOUT
    while not epoch_file.exists():   # the first fine-tuning epoch saved: kill rank 1 inside the second
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.02)
    pid = _rank_pid(tag, 1)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    code, _, err = _finish(process)
    assert code == 1
    errors = _errors(err)
    assert len(errors) == 1, err[-3000:]
    assert errors[0].startswith(f"deepshrink: error: rank 1 failed: killed by signal 9 (SIGKILL), pid {pid}")
    assert "--resume" in errors[0]
    state = json.loads((workdir / "killed" / "state" / "state.json").read_text())
    assert state["completed"] == 2 and epoch_file.is_file()   # train and prune done, one epoch of finetune
    assert torch.load(epoch_file, weights_only=True)["epoch"] == 0

    code, _, err = _finish(_deepshrink(workdir, *run, "--resume"))
    assert code == 0, err[-3000:]
    assert "resuming ddp: stages 1-2 already done" in err
    resumed, uninterrupted = _weights(workdir / "killed"), _weights(two_processes)
    worst = max(float((resumed[k] - uninterrupted[k]).abs().max()) for k in resumed)
    assert worst == 0.0, f"max |w_resumed - w| = {worst:.3g}"
    assert _files(workdir / "killed") == _files(two_processes)


def test_a_global_batch_that_does_not_split_is_refused_before_any_process_starts(workdir, capsys):
    code = main(["run", str(workdir / "ddp.yaml"), "--out", str(workdir / "never"), "--nproc-per-node", "3"])
    err = capsys.readouterr().err
    assert code == 2
    assert _errors(err) == [err.strip()]
    assert "stages[0].train.batch_size: batch_size 64 is not divisible by the 3 processes" in err
    assert "stages[2].finetune.batch_size: batch_size 16 is not divisible" in err and "use 15 or 18" in err
    assert not (workdir / "never").exists()


def test_an_input_error_on_the_ranks_is_one_line_naming_a_rank(workdir, tmp_path):
    (tmp_path / "mnist.yaml").write_text("name: m\nmodel: lenet-5\ndata: {name: mnist}\nstages:\n  - finetune: {epochs: 1}\n")
    code, _, err = _finish(_deepshrink(tmp_path, "run", "mnist.yaml", "--nproc-per-node", "2", "--data-dir", "nowhere"))
    assert code == 2   # an input error, as without torchrun: no --resume hint
    assert _errors(err) == [err.strip()], err[-3000:]
    assert err.startswith("deepshrink: error: rank 0 failed: mnist: IDX files not found (looked in nowhere")
    assert "--resume" not in err and not any(p.is_file() for p in (tmp_path / "out").rglob("*"))


def test_per_rank_batch():
    assert distributed.per_rank_batch(64, 2) == 32
    with pytest.raises(ConfigError, match="batch_size 10 is not divisible by the 4 processes.*use 8 or 12"):
        distributed.per_rank_batch(10, 4)
    with pytest.raises(ConfigError, match="use 4$"):
        distributed.per_rank_batch(3, 4)


def _failure(rank_exit: int, message: str | None = None, *, peer_lost: bool = False, timestamp: int = 100):
    data = {"message": {"message": message, "extraInfo": {"deepshrink_peer_lost": str(peer_lost)}}} if message else {}
    name = {-9: "SIGKILL", -15: "SIGTERM"}.get(rank_exit, "<N/A>")
    return SimpleNamespace(error_file_data=data, exitcode=rank_exit, pid=1000 - rank_exit, timestamp=timestamp,
                           signal_name=lambda: name)


def test_blame_names_the_cause_not_the_survivors():
    # the agent's SIGTERM to the survivor, at the same second: the killed rank is named
    assert distributed.blame({0: _failure(-15), 1: _failure(-9)}) == (1, "killed by signal 9 (SIGKILL), pid 1009")
    # the survivor noticed first, its collective lost the connection: still the killed rank
    lost = _failure(1, "RuntimeError: Connection reset by peer", peer_lost=True, timestamp=99)
    assert distributed.blame({0: lost, 1: _failure(-9)})[0] == 1
    # a rank's own error wins over a signal, and an earlier own error over a later one
    own = _failure(1, "DataError: data/mnist is missing")
    assert distributed.blame({0: _failure(-15), 1: own}) == (1, "DataError: data/mnist is missing")
    assert distributed.blame({0: _failure(1, "ValueError: b", timestamp=101), 1: _failure(1, "ValueError: a")})[0] == 1
    assert distributed.blame({0: _failure(2)}) == (0, "exited with code 2")
    # the same input error on every rank: the lowest rank, though another wrote its error a second earlier
    same = "DataError: mnist: IDX files not found"
    assert distributed.blame({0: _failure(1, same, timestamp=101), 1: _failure(1, same, timestamp=100)}) == (0, same)


def _recipe(stages: list) -> dict:
    return {"name": "r", "model": "lenet-300-100", "data": {"name": "digits"}, "stages": stages}


def test_device_is_a_validated_field_of_the_stages_that_train():
    recipe = parse_recipe(_recipe([{"train": {"epochs": 1, "device": "auto"}}, {"finetune": {"device": "cpu"}},
                                   {"quantize": {"scheme": "int8-dynamic"}}]))
    assert [s.device for s in recipe.stages] == ["auto", "cpu", None]
    assert recipe.stages[0].as_dict() == {"train": {**recipe.stages[0].as_dict()["train"], "device": "auto"}}
    assert parse_recipe(recipe.as_dict()) == recipe   # the dict round trip keeps it
    # where a stage trains is not what the recipe computes: a run resumes on another device
    plain = parse_recipe(_recipe([{"train": {"epochs": 1}}, {"finetune": {}}, {"quantize": {"scheme": "int8-dynamic"}}]))
    assert recipe.fingerprint() == plain.fingerprint()
    with pytest.raises(ConfigError) as caught:
        parse_recipe(_recipe([{"train": {"device": "gpu", "epochs": -1}}, {"evaluate": {"device": "cpu"}}]))
    problems = caught.value.problems
    assert any(p.startswith("stages[0].train.device: 'gpu' is not one of cpu, cuda, auto") for p in problems)
    assert any(p.startswith("stages[0].train.epochs:") for p in problems)   # the config's own faults too
    assert any(p.startswith("stages[1].evaluate.device: only stages that train take a device") for p in problems)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_is_refused_where_there_is_none():
    with pytest.raises(ConfigError, match=r"stages\[0\]\.finetune\.device: 'cuda' but torch finds no CUDA device"):
        parse_recipe(_recipe([{"finetune": {"device": "cuda"}}]))


def test_stage_trains():
    recipe = parse_recipe(_recipe([
        {"train": {"epochs": 1}},
        {"prune": {"method": "magnitude", "sparsity": 0.5}},
        {"prune": {"method": "magnitude", "sparsity": 0.6, "retrain": {"epochs": 1}}},
        {"prune": {"method": "magnitude", "sparsity": 0.7, "retrain": {"epochs": 0}}},   # fit without epochs: rank 0
        {"prune": {"method": "variational"}},
        {"finetune": {}},
        {"quantize": {"scheme": "int8-static"}},
        {"evaluate": {}},
    ]))
    assert [stage_trains(s) for s in recipe.stages] == [True, False, True, False, True, True, False, False]
    qat = parse_recipe(_recipe([{"quantize": {"scheme": "int8-qat"}}])).stages[0]
    assert stage_trains(qat)
