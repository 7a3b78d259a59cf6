"""Issue 6: Deep Compression's MNIST table, reproduced with our pipeline and the .dsk container.

    .venv/bin/python bench/deep_compression.py       # trains, compresses, writes bench/results/deep_compression.md

Runs four packaged recipes end to end (dense training included), two at a time, one thread each:
Han et al.'s method with our stages (``deep-compression-NET.yaml``) and sparse variational dropout
(``sparse-vd-NET.yaml``). Copies each compressed .dsk to bench/artifacts/ and reports sizes per
layer from the container's own accounting. Finished runs are cached in bench/.cache/ (resumed).
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor

from common import REPO, SHARED_DATA, provenance

# Han, Mao, Dally, ICLR 2016, Table 2/3 (MNIST)
PAPER = {
    "lenet-300-100": {"dense_error": 1.64, "error": 1.58, "dense_kb": 1070, "kb": 27, "ratio": 40},
    "lenet-5": {"dense_error": 0.80, "error": 0.74, "dense_kb": 1720, "kb": 44, "ratio": 39},
}
BOUND = {"lenet-300-100": 1.64, "lenet-5": 0.80}
GOAL = {"lenet-300-100": 100, "lenet-5": 200}
PARAMS = {"lenet-300-100": 266_610, "lenet-5": 431_080}
# (net, packaged recipe, method, artifact)
RUNS = [
    ("lenet-300-100", "deep-compression-lenet-300-100", "Han's method: gradual magnitude pruning, k-means", "lenet-300-100-han.dsk"),
    ("lenet-300-100", "sparse-vd-lenet-300-100", "sparse variational dropout, dead units cut, k-means", "lenet-300-100-vd.dsk"),
    ("lenet-5", "deep-compression-lenet-5", "Han's method: gradual magnitude pruning, k-means", "lenet-5-han.dsk"),
    ("lenet-5", "sparse-vd-lenet-5", "sparse variational dropout, dead units cut, k-means", "lenet-5-vd.dsk"),
]


def run(net: str, recipe_name: str, method: str, artifact_name: str) -> dict:
    import torch

    from deepshrink.formats.container import size_breakdown
    from deepshrink.pipeline import load_recipe, run_recipe
    from deepshrink.pipeline.recipe import packaged_recipe

    torch.set_num_threads(1)
    recipe = load_recipe(packaged_recipe(recipe_name))
    recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, data_dir=str(SHARED_DATA / "mnist")))
    out = REPO / "bench" / ".cache" / "deep_compression" / recipe_name
    result = run_recipe(recipe, out, resume=True, progress=False, log=lambda m: print(f"[{recipe_name}] {m}", flush=True))
    artifact = REPO / "bench" / "artifacts" / artifact_name
    shutil.copyfile(out / "compressed.dsk", artifact)
    shutil.copyfile(out / "compressed.dsk.json", artifact.with_name(artifact.name + ".json"))
    return {
        "net": net, "recipe": recipe_name, "method": method, "variants": result.state.variants,
        "artifact": artifact_name, "breakdown": size_breakdown(artifact), "log": result.state.log,
    }


def layer_rows(res: dict) -> list[str]:
    rows = []
    for r in res["breakdown"]:
        if r.get("kind") == "file":
            rows.append(f"| (file header, metadata, checksum) | | | | | {r['total_bits'] / 8:,.0f} | | |")
            continue
        bound, coded = r.get("entropy_bound_bits"), r.get("coded_bits")
        ratio = f"{coded / bound:.3f}" if bound else "—"
        shape = "x".join(map(str, r["shape"]))
        rows.append(
            f"| {r['name']} [{shape}] | {r['kind']} | {r.get('nnz', '')} | {r['positions_bits'] / 8:,.0f} | "
            f"{r['indices_bits'] / 8:,.0f} | {r['total_bits'] / 8:,.0f} | {(r['values_bits'] + r['codebook_bits']) / 8:,.0f} | {ratio} |"
        )
    return rows


def errors(res: dict) -> tuple[float, float, int]:
    v = res["variants"]
    dsk = v["compressed .dsk"]
    return 100 * (1 - v["fp32 eager"]["accuracy"]), 100 * (1 - dsk["accuracy"]), dsk["file_bytes"]


def verdict_of(net: str, error: float, ratio: float) -> str:
    if error > BOUND[net]:
        return "misses the error bound"
    if ratio < PAPER[net]["ratio"]:
        return "misses the ratio"
    return f"meets the paper's bar and the {GOAL[net]}x goal" if ratio >= GOAL[net] else f"meets the paper's bar, not the {GOAL[net]}x goal"


def details(res: dict) -> str:
    net, v = res["net"], res["variants"]
    prune = next(e["summary"] for e in res["log"] if "prune" in e["stage"])
    kept = sum(d["kept"] for d in prune["layers"].values())
    total = sum(d["total"] for d in prune["layers"].values())
    per_layer = ", ".join(f"{n} {100 * d['kept'] / d['total']:.2f} %" for n, d in prune["layers"].items())
    dead = prune.get("removed_dead")
    widths = ("; units nothing read any more were cut out: "
              + ", ".join(f"{n} {d['before']} -> {d['after']}" for n, d in dead.items())) if dead else ""
    coded = sum(r.get("coded_bits") or 0 for r in res["breakdown"])
    bound = sum(r.get("entropy_bound_bits") or 0 for r in res["breakdown"])
    return f"""### {net}: {res['method']} (`{res['recipe']}.yaml`, `bench/artifacts/{res['artifact']}`)

Stage times from the run log, training included: {sum(e['seconds'] for e in res['log']) / 60:.1f} min. Pruned layers keep {kept:,} of {total:,} weights
({100 * kept / total:.2f} %): {per_layer}{widths}. Dense fp32 .pte: {v['fp32 .pte']['file_bytes']:,} B at
{100 * (1 - v['fp32 .pte']['accuracy']):.2f} % error. Stored symbols (positions and codebook indices) take {coded:,.0f} bits
against an entropy bound of {bound:,.0f} bits: **{coded / bound:.3f}x** the bound (target <= 1.1x).

| tensor [shape] | stored as | non-zeros | positions B | indices B | total B | values+codebook B | coded / entropy bound |
|---|---|---:|---:|---:|---:|---:|---:|
{chr(10).join(layer_rows(res))}
"""


def main() -> None:
    workers = 1 if "--serial" in sys.argv else 2
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(run, *zip(*RUNS)))
    summary, chosen = [], []
    for net in PAPER:
        # bench/artifacts/NET.dsk: the smallest file within the error bound (else the lowest error)
        mine = [r for r in results if r["net"] == net]
        within = [r for r in mine if errors(r)[1] <= BOUND[net]]
        best = min(within, key=lambda r: errors(r)[2]) if within else min(mine, key=lambda r: errors(r)[1])
        for suffix in ("", ".json"):  # the file and its sidecar
            shutil.copyfile(REPO / "bench" / "artifacts" / (best["artifact"] + suffix), REPO / "bench" / "artifacts" / f"{net}.dsk{suffix}")
        chosen.append(f"`bench/artifacts/{net}.dsk` is a copy of `{best['artifact']}` ({best['method']}).")
        paper = PAPER[net]
        summary.append(f"| {net} | Han et al. 2016 | {paper['dense_error']:.2f} | {paper['error']:.2f} | "
                       f"{paper['dense_kb']} KB | {paper['kb']} KB | {paper['ratio']}x | |")
        for res in (r for r in results if r["net"] == net):
            dense_err, err, size = errors(res)
            ratio = 4 * PARAMS[net] / size
            verdict = verdict_of(net, err, ratio)
            summary.append(f"| {net} | deepshrink: {res['method']} | {dense_err:.2f} | **{err:.2f}** | "
                           f"{4 * PARAMS[net] / 1000:,.0f} KB | **{size / 1000:.1f} KB** ({size:,} B) | **{ratio:.0f}x** | {verdict} |")
    text = f"""# Deep Compression on MNIST: the paper's rows beside ours

{provenance("python bench/deep_compression.py", threads=1)}
- recipes: `src/deepshrink/pipeline/recipes/{{deep-compression,sparse-vd}}-{{lenet-300-100,lenet-5}}.yaml`, each run end to
  end (its own dense training included), two runs at a time on the 2 cores, one thread each
- error: the official 10,000-image MNIST test set, measured on the model loaded back from the `.dsk` file
- ratio: 4 bytes x dense parameter count / whole `.dsk` file (header, metadata, checksum, codebooks, biases included)
- one run per recipe, seed 0: no spread measured; on 10,000 test images one image is 0.01 pt

| net | source | dense error % | compressed error % | dense size | compressed size | ratio | verdict |
|---|---|---:|---:|---:|---:|---:|---|
{chr(10).join(summary)}

Targets: at least the paper (>= 40x / >= 39x at error <= 1.64 % / <= 0.80 %); goals 100x and 200x.
{chr(10).join(chosen)}
Reproduce any row's error and size: `deepshrink evaluate bench/artifacts/NAME.dsk --data mnist --data-dir ../shared/data/mnist`.
For comparison (weights kept, not file bytes): sparse variational dropout reports 68x fewer LeNet-300-100 weights at
1.92 % and 280x fewer LeNet-5 weights at 0.75 % (Molchanov et al. 2017, 200 epochs); soft weight-sharing 64x / 162x
file compression at 1.94 % / 0.97 % (Ullrich et al. 2017).

## Where the bytes go

{chr(10).join(details(res) for res in results)}
"""
    (REPO / "bench" / "results" / "deep_compression.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
