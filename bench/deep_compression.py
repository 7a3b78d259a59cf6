"""Issue 6: Deep Compression's MNIST table, reproduced with our pipeline and the .dsk container.

    .venv/bin/python bench/deep_compression.py       # trains, compresses, writes bench/results/deep_compression.md

Runs the packaged recipes deep-compression-lenet-300-100.yaml and deep-compression-lenet-5.yaml
end to end (dense training included), copies each compressed .dsk to bench/artifacts/, and reports
sizes per layer from the container's own accounting.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time

import torch

from common import REPO, SHARED_DATA, provenance

from deepshrink.formats.container import size_breakdown
from deepshrink.pipeline import load_recipe, run_recipe
from deepshrink.pipeline.recipe import packaged_recipe

# Han, Mao, Dally, ICLR 2016, Table 2/3 (MNIST)
PAPER = {
    "lenet-300-100": {"dense_error": 1.64, "error": 1.58, "dense_kb": 1070, "kb": 27, "ratio": 40},
    "lenet-5": {"dense_error": 0.80, "error": 0.74, "dense_kb": 1720, "kb": 44, "ratio": 39},
}
PARAMS = {"lenet-300-100": 266_610, "lenet-5": 431_080}


def run(net: str) -> dict:
    recipe = load_recipe(packaged_recipe(f"deep-compression-{net}"))
    recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, data_dir=str(SHARED_DATA / "mnist")))
    out = REPO / "bench" / ".cache" / "deep_compression" / net
    started = time.perf_counter()
    result = run_recipe(recipe, out, resume=True, progress=False)
    seconds = time.perf_counter() - started
    artifact = REPO / "bench" / "artifacts" / f"{net}.dsk"
    shutil.copyfile(out / "compressed.dsk", artifact)
    shutil.copyfile(out / "compressed.dsk.json", artifact.with_name(artifact.name + ".json"))
    v = result.state.variants
    return {
        "net": net, "seconds": seconds, "variants": v, "artifact": artifact,
        "breakdown": size_breakdown(artifact), "log": result.state.log,
    }


def layer_rows(res: dict) -> list[str]:
    rows = []
    for r in res["breakdown"]:
        if r.get("kind") == "file":
            rows.append(f"| (file header, checksum) | | | | | {r['total_bits'] / 8:,.0f} | | |")
            continue
        total = r["total_bits"] / 8
        bound = r.get("entropy_bound_bits")
        coded = r.get("coded_bits")
        ratio = f"{coded / bound:.3f}" if bound else "—"
        rows.append(
            f"| {r['name']} | {r['kind']} | {r.get('nnz', '')} | {r['positions_bits'] / 8:,.0f} | {r['indices_bits'] / 8:,.0f} | "
            f"{total:,.0f} | {(r['values_bits'] + r['codebook_bits']) / 8:,.0f} | {ratio} |"
        )
    return rows


def main() -> None:
    torch.set_num_threads(1)
    results = [run(net) for net in ("lenet-300-100", "lenet-5")]
    summary, details = [], []
    for res in results:
        net, v, paper = res["net"], res["variants"], PAPER[res["net"]]
        dense_err = 100 * (1 - v["fp32 eager"]["accuracy"])
        dsk = v["compressed .dsk"]
        err = 100 * (1 - dsk["accuracy"])
        size = dsk["file_bytes"]
        ratio = 4 * PARAMS[net] / size
        coded = sum(r.get("coded_bits") or 0 for r in res["breakdown"])
        bound = sum(r.get("entropy_bound_bits") or 0 for r in res["breakdown"])
        summary.append(f"| {net} | Han et al. 2016 | {paper['dense_error']:.2f} | {paper['error']:.2f} | {paper['dense_kb']} KB | {paper['kb']} KB | {paper['ratio']}x |")
        summary.append(f"| {net} | deepshrink | {dense_err:.2f} | **{err:.2f}** | {4 * PARAMS[net] / 1000:,.0f} KB | **{size / 1000:.1f} KB** ({size:,} B) | **{ratio:.0f}x** |")
        prune = next(e["summary"] for e in res["log"] if "prune" in e["stage"])
        kept = sum(d["kept"] for d in prune["layers"].values())
        total = sum(d["total"] for d in prune["layers"].values())
        per_layer = ", ".join(f"{n} {100 * d['kept'] / d['total']:.1f} %" for n, d in prune["layers"].items())
        details.append(f"""### {net}

Run time (training included): {res['seconds'] / 60:.1f} min. Pruned layers keep {kept:,} of {total:,} weights
({100 * kept / total:.2f} %): {per_layer}. Dense fp32 .pte: {v['fp32 .pte']['file_bytes']:,} B at {100 * (1 - v['fp32 .pte']['accuracy']):.2f} % error.
Stored symbols (positions and codebook indices) take {coded:,.0f} bits against an entropy bound of
{bound:,.0f} bits: **{coded / bound:.3f}x** the bound (target <= 1.1x).

| tensor | stored as | non-zeros | positions B | indices B | total B | values+codebook B | coded / entropy bound |
|---|---|---:|---:|---:|---:|---:|---:|
{chr(10).join(layer_rows(res))}
""")
    text = f"""# Deep Compression on MNIST: the paper's rows beside ours

{provenance("python bench/deep_compression.py", threads=1)}
- recipes: `src/deepshrink/pipeline/recipes/deep-compression-lenet-300-100.yaml` and `deep-compression-lenet-5.yaml`, run end to end
  (dense training, gradual magnitude pruning distilled from the dense model, k-means weight sharing with centroid fine-tuning, .dsk)
- error: the official 10,000-image MNIST test set, measured on the model loaded back from the `.dsk` file
- ratio: 4 bytes x dense parameter count / whole `.dsk` file (header, checksum, codebooks, biases included)
- one run per net, seed 0; no spread measured

| net | source | dense error % | compressed error % | dense size | compressed size | ratio |
|---|---|---:|---:|---:|---:|---:|
{chr(10).join(summary)}

Targets: at least the paper (>= 40x / >= 39x at error <= 1.64 % / <= 0.80 %); goals 100x and 200x.
Artifacts: `bench/artifacts/lenet-300-100.dsk`, `bench/artifacts/lenet-5.dsk`; reproduce each with
`deepshrink evaluate bench/artifacts/NET.dsk --data mnist --data-dir ../shared/data/mnist`.

## Where the bytes go

{chr(10).join(details)}
"""
    (REPO / "bench" / "results" / "deep_compression.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
