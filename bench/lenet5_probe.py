"""Which channel cut and fine-tune of LeNet-5 the shipped file starts from, chosen on validation error.

    .venv/bin/python bench/lenet5_probe.py          # ~40 min on 2 cores (one variant per core, one thread each);
                                                    # writes bench/results/lenet5_probe.md

Each variant prunes a dense LeNet-5 (the baseline of bench/baselines.py, or its recipe trained longer) by channels
and fine-tunes it by distillation from that dense model, seed 0, keeping the weights of its best validation epoch. The variant bench/shipped.py uses is the
one with the lowest error on the 5,000-image validation split (held out of training); the test error is
printed beside it but plays no part in the choice. Each variant's model is cached in bench/.cache/shipped/
under its name, so bench/shipped.py reuses the chosen one.
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from baselines import RECIPES, dense_baseline, mnist
from common import REPO, provenance
from structured import DISTILL

from deepshrink.core.counting import count_macs
from deepshrink.models import create, load, save_checkpoint
from deepshrink.pruning import ChannelPruning, prune
from deepshrink.training import Distillation, TrainConfig, accuracy, fit

WORK = REPO / "bench" / ".cache" / "shipped"
R60 = ChannelPruning(ratio=0.6, scope="local", importance="taylor", overrides={"fc1": 0.81})
R50 = ChannelPruning(ratio=0.5, scope="local", importance="taylor", overrides={"fc1": 0.81})
R40 = ChannelPruning(ratio=0.4, scope="local", importance="taylor", overrides={"fc1": 0.81})
# name -> (pruning, fine-tuning, epochs of the dense model it starts from and distils from: None is the
# baseline of bench/baselines.py, the reference of every table); "r60-e20" is the cut shipped at 90f7872
VARIANTS = {
    "r60-e20": (R60, TrainConfig(epochs=20, lr=1e-3, batch_size=128, distill=DISTILL, seed=0), None),
    "r60-e40": (R60, TrainConfig(epochs=40, lr=1e-3, batch_size=128, distill=DISTILL, seed=0), None),
    "r60-e20-a9": (R60, TrainConfig(epochs=20, lr=1e-3, batch_size=128, distill=Distillation(temperature=4.0, alpha=0.9),
                                    seed=0), None),
    "r50-e20": (R50, TrainConfig(epochs=20, lr=1e-3, batch_size=128, distill=DISTILL, seed=0), None),
    "d12-r60-e40": (R60, TrainConfig(epochs=40, lr=1e-3, batch_size=128, distill=DISTILL, seed=0), 12),
    "d12-r40-e40": (R40, TrainConfig(epochs=40, lr=1e-3, batch_size=128, distill=DISTILL, seed=0), 12),
    # the training images moved by up to 1 or 2 pixels each way (TrainConfig.random_shift)
    "r60-e40-s1": (R60, TrainConfig(epochs=40, lr=1e-3, batch_size=128, distill=DISTILL, random_shift=1, seed=0), None),
    "r60-e40-s2": (R60, TrainConfig(epochs=40, lr=1e-3, batch_size=128, distill=DISTILL, random_shift=2, seed=0), None),
}


def checkpoint(name: str) -> Path:
    return WORK / f"lenet-5-structured-{name}.safetensors"


def dense_start(epochs: int | None, data) -> torch.nn.Module:
    """The dense LeNet-5 a variant starts from: the baseline, or the same recipe and seed trained
    ``epochs`` epochs (cached), eval mode."""
    if epochs is None:
        return dense_baseline("lenet-5", data)[0].eval()
    path = WORK / f"lenet-5-dense-e{epochs}.safetensors"
    if path.is_file():
        return load(path).eval()
    torch.manual_seed(0)
    model = create("lenet-5")
    fit(model, data, TrainConfig(**{**RECIPES["lenet-5"], "epochs": epochs}, seed=0), progress=False)
    save_checkpoint(model, path)
    return model.eval()


def start_label(epochs: int | None) -> str:
    recipe = RECIPES["lenet-5"]
    return ("the baseline (bench/baselines.py: " if epochs is None else f"the baseline's recipe for {epochs} epochs (") + \
        f"Adam lr {recipe['lr']}, batch {recipe['batch_size']}, cosine{'' if epochs else ', ' + str(recipe['epochs']) + ' epochs'}, seed 0)"


def pruned_lenet5(name: str, data) -> torch.nn.Module:
    """The variant ``name`` of LeNet-5, pruned from its dense start and fine-tuned by distillation from
    it (cached in ``checkpoint(name)``), eval mode."""
    path = checkpoint(name)
    if path.is_file():
        return load(path).eval()
    pruning, finetune, dense_epochs = VARIANTS[name]
    dense = dense_start(dense_epochs, data)
    torch.manual_seed(0)
    model = copy.deepcopy(dense)
    prune(model, pruning, example_input=data.example_input(64), data=data)
    fit(model, data, finetune, teacher=dense, progress=False)
    save_checkpoint(model, path)
    return model.eval()


def error(model, data, split: str) -> float:
    return 100 * (1 - accuracy(model, data.loader(split, batch_size=1000)))


def train_one(name: str) -> dict:
    """Prune and fine-tune one variant (cached), and score it on val and test."""
    torch.set_num_threads(1)
    data = mnist()
    started, cached = time.perf_counter(), checkpoint(name).is_file()
    model = pruned_lenet5(name, data)
    shapes = {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    return {"name": name, "val": error(model, data, "val"), "test": error(model, data, "test"),
            "macs": count_macs(model, data.example_input(1)), "shapes": {k: list(v) for k, v in shapes.items()},
            "seconds": None if cached else time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--one", choices=list(VARIANTS), help="(internal) train and score one variant, print JSON")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="run and choose among these only (default: all)")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(train_one(args.one)), flush=True)
        return
    WORK.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    data = mnist()
    started = time.perf_counter()
    # every dense start trained once here, before the workers share it
    starts = {epochs: dense_start(epochs, data) for epochs in dict.fromkeys(VARIANTS[v][2] for v in args.variants)}
    pending, running, results = list(args.variants), [], []
    while pending or running:
        while pending and len(running) < args.jobs:
            name = pending.pop(0)
            running.append(subprocess.Popen([sys.executable, __file__, "--one", name], stdout=subprocess.PIPE, text=True))
        time.sleep(2)
        for proc in [p for p in running if p.poll() is not None]:
            running.remove(proc)
            out = proc.stdout.read().strip().splitlines()
            if proc.returncode != 0 or not out:
                raise SystemExit(f"a variant failed (exit {proc.returncode})")
            results.append(json.loads(out[-1]))
            print(f"{results[-1]['name']}: val {results[-1]['val']:.2f} %, test {results[-1]['test']:.2f} %", flush=True)
    results.sort(key=lambda r: list(VARIANTS).index(r["name"]))
    best = min(results, key=lambda r: (r["val"], r["macs"]))
    rows = ["| variant | starts from and distils from | pruning | fine-tuning | kept shapes (conv1, conv2, fc1, fc2) | MACs | "
            "val error % | test error % | prune + fine-tune s |", "|---|---|---|---|---|---:|---:|---:|---:|"]
    for epochs, dense in starts.items():
        rows.append(f"| dense, {start_label(epochs)} | — | — | — | — | {count_macs(dense, data.example_input(1)):,} | "
                    f"{error(dense, data, 'val'):.2f} | {error(dense, data, 'test'):.2f} | — |")
    for r in results:
        pruning, finetune, epochs = VARIANTS[r["name"]]
        kept = ", ".join(str(s[0]) for s in r["shapes"].values())
        mark = " **(chosen)**" if r is best else ""
        rows.append(f"| {r['name']}{mark} | dense, {start_label(epochs)} | ratio {pruning.ratio}, fc1 {pruning.overrides.get('fc1')} | "
                    f"{finetune.epochs} epochs, "
                    f"lr {finetune.lr}, distill T {finetune.distill.temperature} alpha {finetune.distill.alpha}"
                    f"{f', shift ±{finetune.random_shift} px' if finetune.random_shift else ''} | {kept} | "
                    f"{r['macs']:,} | {r['val']:.2f} | {r['test']:.2f} | "
                    f"{'cached' if r['seconds'] is None else format(r['seconds'], '.0f')} |")
    out = ["# LeNet-5: which channel cut and fine-tune the shipped file starts from", "",
           provenance("python bench/lenet5_probe.py" + ("" if args.variants == list(VARIANTS) else
                                                        " --variants " + " ".join(args.variants)), 1),
           f"- total wall time {(time.perf_counter() - started) / 60:.1f} min, {args.jobs} variants at a time, one thread each; "
           "one run per variant, seed 0; no spread measured; \"cached\": read from bench/.cache/shipped/, trained by "
           "an earlier run of this script (its time was not measured in this one)",
           "- chosen: the lowest validation error (5,000 training images held out of fine-tuning); test error is shown, "
           "never used to choose", "- error: PyTorch eager, fp32 (the runtime files are measured by bench/shipped.py)", "",
           *rows, "", f"bench/shipped.py starts from `{best['name']}` (`LENET_VARIANT` there).", ""]
    (REPO / "bench" / "results" / "lenet5_probe.md").write_text("\n".join(out))
    print("\n".join(out))


if __name__ == "__main__":
    main()
