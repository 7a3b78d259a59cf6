"""Training on several processes: torchrun launches them, ``DistributedDataParallel`` trains.

A run is distributed when it is started by torchrun (``deepshrink run --nproc-per-node N`` calls
``torch.distributed.run`` itself): every process then runs ``fit`` on its share of each global
batch (``DistributedSampler``; per-process batch = ``batch_size`` / world size, so a recipe's batch
means the same at any process count) and DDP averages the gradients, so all processes hold the
same weights after every step. Only rank 0 reads and writes the run's files (every rank reads the
dataset); what the others need from them (a per-epoch resume file, the run state) rank 0 broadcasts. Backends: ``gloo`` for CPU tensors,
``nccl`` for CUDA ones when CUDA is present.

``device``: where ``fit`` trains (``cpu`` | ``cuda`` | ``auto``), given to ``fit`` or set for a
block with ``training_device`` (how a recipe stage's ``device:`` reaches the loops that QAT and
learned sparsity run inside their own verbs). The model always comes back on the CPU.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import time
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from deepshrink.core.errors import ConfigError, DeepshrinkError
from deepshrink.core.masks import attach_masks, get_masks

DEVICES = ("cpu", "cuda", "auto")
LAUNCHED = "DEEPSHRINK_LAUNCHED"   # set for the processes `deepshrink run --nproc-per-node` starts
# how long a rank waits at a collective: the others wait there while rank 0 alone runs the stages
# between two trainings (a one-shot prune, a sensitivity sweep); a dead rank ends the run at once anyway
TIMEOUT = datetime.timedelta(minutes=60)
_DEVICE: ContextVar[str] = ContextVar("deepshrink_training_device", default="cpu")


class RankFailed(DeepshrinkError):
    """A process of a distributed run died or failed; ``rank`` names it. ``input_error``: it failed on
    an input (a ``DeepshrinkError``: a missing file, a bad value), which ``--resume`` does not fix."""

    def __init__(self, rank: int, message: str, *, input_error: bool = False) -> None:
        self.rank, self.input_error = rank, input_error
        super().__init__(f"rank {rank} failed: {message}")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None   # None: not distributed

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """Whether torchrun started this process (its environment names a rank and a world)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world() -> World:
    if active():
        dist = torch.distributed
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), str(dist.get_backend()))
    return World(int(os.environ.get("RANK", 0)) if launched() else 0)


def is_main() -> bool:
    return world().main


def start() -> bool:
    """Join the process group torchrun's environment describes (True), or do nothing (False:
    not started by torchrun, or already joined)."""
    if not launched() or active():
        return False
    backend, local = "gloo", int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available() and local < torch.cuda.device_count():   # a GPU of its own: NCCL for CUDA tensors
        torch.cuda.set_device(local)
        backend = "cpu:gloo,cuda:nccl"
    torch.distributed.init_process_group(backend, timeout=TIMEOUT)
    return True


def stop() -> None:
    if active():
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def training_device(name: str | None) -> Iterator[None]:
    """``fit`` calls inside the block train on ``name`` (None: the CPU)."""
    token = _DEVICE.set(name or "cpu")
    try:
        yield
    finally:
        _DEVICE.reset(token)


def resolve_device(name: str | None = None) -> torch.device:
    """``cpu`` | ``cuda`` | ``auto`` (``name``, else the enclosing ``training_device``) as a device;
    under torchrun, CUDA is this process's own GPU (``LOCAL_RANK``)."""
    name = name or _DEVICE.get()
    if name not in DEVICES:
        raise ConfigError(f"device: {name!r} is not one of {', '.join(DEVICES)}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' but torch finds no CUDA device (torch.cuda.is_available() is False); "
                          "use device: cpu, or auto (CUDA when present)")
    if not launched():
        return torch.device("cuda", torch.cuda.current_device())
    local = int(os.environ.get("LOCAL_RANK", 0))
    if local >= torch.cuda.device_count():
        raise ConfigError(f"device: 'cuda' but this machine has {torch.cuda.device_count()} GPU(s) for more processes "
                          f"(local rank {local}); start at most that many per machine (--nproc-per-node), or use device: cpu")
    return torch.device("cuda", local)


def per_rank_batch(batch_size: int, size: int | None = None) -> int:
    """Each process's share of a global batch; a batch that does not split evenly is refused."""
    size = world().size if size is None else size
    if batch_size % size:
        raise ConfigError(batch_message(batch_size, size))
    return batch_size // size


def batch_message(batch_size: int, size: int) -> str:
    lower, upper = batch_size // size * size, -(-batch_size // size) * size
    return (f"batch_size {batch_size} is not divisible by the {size} processes (each takes batch_size / {size} "
            f"samples a step, so a global batch means the same at any process count); use "
            + (f"{lower} or {upper}" if lower else f"{upper}"))


def train_loader(base: DataLoader, *, seed: int) -> DataLoader:
    """``base`` (a training loader of the per-process batch) drawing this process's share of one
    global shuffled order: ``DistributedSampler`` permutes with ``seed + epoch`` (``set_epoch``)
    and deals the permutation out round-robin, so global batch k holds the same samples at any
    process count (padded with repeats when the sample count does not divide by the processes)."""
    w = world()
    sampler = DistributedSampler(base.dataset, num_replicas=w.size, rank=w.rank, shuffle=True, seed=seed)
    return DataLoader(base.dataset, batch_size=base.batch_size, sampler=sampler, collate_fn=base.collate_fn)


def set_epoch(loader: DataLoader, epoch: int, seed: int) -> None:
    """Start an epoch: the sampler's permutation for it, and on ranks other than 0 a random stream
    of their own (dropout, variational noise: each rank's samples get independent draws; rank 0
    keeps the stream a 1-process run has, which its per-epoch resume file saves)."""
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
        if loader.sampler.rank:
            torch.manual_seed((seed + 1_000_003 * loader.sampler.rank + 7_919 * (epoch + 1)) % 2**63)


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` for the training steps: ``DistributedDataParallel`` around it when distributed
    (its construction copies rank 0's parameters and buffers to every process), else itself."""
    _masks_to(model, device)
    if not active():
        return model
    _share_masks(model)
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    # samples.call reads the forward signature of the model itself, not DDP's (*inputs, **kwargs)
    object.__setattr__(ddp, "wrapped_model", model)
    return ddp


def unwrap(model: nn.Module, device: torch.device, teacher: nn.Module | None = None) -> None:
    """Back on the CPU after training on another device (exports and state files are CPU's)."""
    if device.type == "cpu":
        return
    model.to("cpu")
    _masks_to(model, torch.device("cpu"))
    if teacher is not None:
        teacher.to("cpu")


def _masks_to(model: nn.Module, device: torch.device) -> None:
    # masks kept beside the module do not follow model.to(); masks inside it (parametrize) do
    masks = get_masks(model)
    if any(m.device != device for m in masks.values()):
        attach_masks(model, {name: m.to(device) for name, m in masks.items()})


def _share_masks(model: nn.Module) -> None:
    """Rank 0's masks on every process (each rank computed its own; they agree unless a criterion
    was not deterministic), so the same weights stay zero everywhere."""
    masks = get_masks(model)
    if not masks:
        return
    shared = {name: m.to(torch.uint8).cpu() for name, m in masks.items()}
    for tensor in shared.values():
        torch.distributed.broadcast(tensor, 0)
    if any(not torch.equal(shared[name].bool(), m.cpu()) for name, m in masks.items()):
        attach_masks(model, {name: t.bool().to(masks[name].device) for name, t in shared.items()})


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` (any picklable object) on every process; itself when not distributed."""
    if not active():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0, device=torch.device("cpu"))
    return box[0]


def on_main(fn: Callable[[], Any]) -> Any:
    """``fn()`` computed by rank 0 alone (e.g. validation accuracy), its result given to every process."""
    if not active():
        return fn()
    return broadcast(fn() if is_main() else None)


def sum_over_ranks(*values: float) -> tuple[float, ...]:
    if not active():
        return values
    total = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(total)
    return tuple(total.tolist())


def load_resume(path: str | os.PathLike | None) -> dict | None:
    """A per-epoch resume file, read by rank 0 and broadcast (the other processes may not share its disk)."""
    if path is None:
        return None
    state = torch.load(path, weights_only=True, map_location="cpu") if is_main() and Path(path).is_file() else None
    return broadcast(state) if active() else state


# --- launching ------------------------------------------------------------------------------------


def launch(args: Sequence[str], *, nproc_per_node: int, nnodes: int = 1, node_rank: int = 0,
           master_addr: str = "127.0.0.1", master_port: int | None = None, quiet_logs: bool = True) -> None:
    """Run ``python -m deepshrink ARGS`` on ``nproc_per_node`` processes of this node through torchrun
    (``torch.distributed.run``). One node without a port: a free port on the loopback. Raises
    ``RankFailed`` naming the process that failed first."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    options = ["--nnodes", str(nnodes), "--node-rank", str(node_rank), "--nproc-per-node", str(nproc_per_node),
               "--master-addr", master_addr, "--max-restarts", "0"]
    if master_port is not None:
        options += ["--master-port", str(master_port)]
    parsed = get_args_parser().parse_args([*options, "--module", "deepshrink", *args])
    saved = {name: os.environ.get(name) for name in (LAUNCHED, "OMP_NUM_THREADS")}
    os.environ[LAUNCHED] = "1"
    # this machine's cores shared out (torchrun's own default is 1 thread a process)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc_per_node)))
    # torchrun's agent logs every worker's start and exit; the one line below says what matters
    import logging

    from deepshrink.core.log import scoped_levels

    try:
        with scoped_levels({"torch.distributed": logging.CRITICAL} if quiet_logs else {}):
            run(parsed)
    except ChildFailedError as err:
        rank, message = blame(err.failures)
        info = _extra_info(err.failures[rank])
        raise RankFailed(rank, message, input_error=info.get("deepshrink_input_error") == "True") from None
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def blame(failures: dict) -> tuple[int, str]:
    """The process whose failure came first in cause, not only in time: its own error, then a signal
    from outside, then an exit code, and last what failed because a peer was gone (the agent's
    SIGTERM to the survivors, a collective that lost its connection). Ranks that failed with the same
    message (one input error seen by every rank) name the lowest of them, whichever wrote first."""
    def describe(failure) -> tuple[int, str]:
        data = failure.error_file_data.get("message") if isinstance(failure.error_file_data, dict) else None
        if isinstance(data, dict) and data.get("message"):
            secondary = _extra_info(failure).get("deepshrink_peer_lost") == "True"
            return (3 if secondary else 0), str(data["message"])
        if failure.exitcode < 0:
            name = failure.signal_name()
            return (2 if name == "SIGTERM" else 1), f"killed by signal {-failure.exitcode} ({name}), pid {failure.pid}"
        return 1, f"exited with code {failure.exitcode}"

    order = []
    for rank, failure in failures.items():
        priority, message = describe(failure)
        order.append((priority, failure.timestamp, rank, message))
    _, _, rank, message = min(order)
    return min(r for _, _, r, m in order if m == message), message


def _extra_info(failure) -> dict:
    data = failure.error_file_data.get("message") if isinstance(failure.error_file_data, dict) else None
    info = data.get("extraInfo") if isinstance(data, dict) else None
    return {k: str(v) for k, v in info.items()} if isinstance(info, dict) else {}


def peer_lost(err: BaseException) -> bool:
    """An error raised because another process is gone (its connection closed mid-collective)."""
    text = str(err)
    return isinstance(err, getattr(torch.distributed, "DistError", ())) or any(
        s in text for s in ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "gloo/transport"))


def record_failure(line: str, err: BaseException) -> bool:
    """Under ``launch``, hand this process's one-line error to the launcher (which prints it, naming
    the rank) instead of printing it; False when not launched by ``launch``."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not os.environ.get(LAUNCHED) or not path:
        return False
    data = {"message": {"message": line, "extraInfo": {
        "timestamp": str(int(time.time())), "deepshrink_peer_lost": str(peer_lost(err)),
        "deepshrink_input_error": str(isinstance(err, DeepshrinkError))}}}
    try:
        Path(path).write_text(json.dumps(data))
    except OSError:
        return False
    return True


__all__ = [
    "DEVICES", "RankFailed", "World", "active", "blame", "broadcast", "is_main", "launch", "launched", "load_resume",
    "on_main", "per_rank_batch", "record_failure", "resolve_device", "set_epoch", "start", "stop", "sum_over_ranks",
    "train_loader", "training_device", "world", "wrap", "unwrap",
]
