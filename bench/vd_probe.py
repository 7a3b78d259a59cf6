"""Probe sparse variational dropout settings from a cached dense baseline (no dense retraining).

    .venv/bin/python bench/vd_probe.py lenet-5 --kl-weight 0.5 --epochs 20
    .venv/bin/python bench/vd_probe.py lenet-300-100 --kl-weight 0.5 --epochs 30 --retrain 15
    .venv/bin/python bench/vd_probe.py lenet-5 --kl-weight 0.7 --epochs 20 --shift 2   # images moved <= 2 px

Loads bench/.cache/NET-dense.safetensors (trained by bench/baselines.py if missing), prunes every
layer with method `variational` (dead units cut out), optionally retrains with distillation, shares
weights with 5-bit k-means and centroid fine-tuning, writes a .dsk and prints its test error and
size. One point per call; bench/results/vd_probe.md lists the points measured so far.
"""
from __future__ import annotations

import argparse
import tempfile

import torch

from baselines import CACHE, dense_baseline, mnist


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("net", choices=["lenet-300-100", "lenet-5"])
    parser.add_argument("--kl-weight", type=float, default=1.0)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--retrain", type=int, default=0, help="distilled retraining epochs after pruning (0: none)")
    parser.add_argument("--shift", type=int, default=0, help="random_shift of the training images in every stage that trains (pixels)")
    parser.add_argument("--tables", choices=["float32", "float16"], default="float32",
                        help="Codebook tables: float16 rounds levels and biases (2 bytes each in the .dsk)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from deepshrink.pipeline import parse_recipe, run_recipe

    data = mnist()
    dense, _ = dense_baseline(args.net, data)  # makes sure the cached checkpoint exists
    dense_bytes = 4 * sum(p.numel() for p in dense.parameters())
    retrain = ({"retrain": {"epochs": args.retrain, "lr": 0.0003, "batch_size": 128,
                            "distill": {"temperature": 2.0, "alpha": 0.7}, "random_shift": args.shift}} if args.retrain else {})
    recipe = parse_recipe({"name": "vd-probe", "model": args.net, "data": {"name": "mnist"}, "stages": [
        {"load": {"checkpoint": str(CACHE / f"{args.net}-dense.safetensors")}},
        {"prune": {"method": "variational", "skip_classifier": False, "skip_first_conv": False,
                   "kl_weight": args.kl_weight, "train": {"epochs": args.epochs, "lr": 0.001, "batch_size": 128,
                                                         "random_shift": args.shift},
                   **retrain, "remove_dead": True}},
        {"quantize": {"scheme": "codebook", "method": "kmeans", "bits": 5, "layers": {"*": 5},
                      "train": {"epochs": 2, "lr": 0.0001, "random_shift": args.shift}, "tables": args.tables}},
        {"export": {"formats": ["dsk"]}},
        {"evaluate": {"latency_runs": 0}},
    ]})
    result = run_recipe(recipe, args.out or tempfile.mkdtemp(), data=data, progress=False, log=print)
    dsk = result.state.variants["compressed .dsk"]
    print(f"RESULT {args.net} kl_weight {args.kl_weight} epochs {args.epochs} retrain {args.retrain} shift {args.shift} tables {args.tables}: "
          f"error {100 * (1 - dsk['accuracy']):.2f} %, {dsk['file_bytes']:,} B, "
          f"{dense_bytes / dsk['file_bytes']:.1f}x")


if __name__ == "__main__":
    main()
