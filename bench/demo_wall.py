"""Wall time of `deepshrink demo` once the venv exists (issue 2's target: <= 60 s on 2 cores).

    .venv/bin/python bench/demo_wall.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from common import REPO, provenance


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    walls, checks = [], None
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            subprocess.run([str(REPO / ".venv" / "bin" / "deepshrink"), "demo", "--out", out], check=True, capture_output=True)
            walls.append(time.perf_counter() - start)
            doc = json.loads((Path(out) / "metrics.json").read_text())
            checks = doc["checks"]
            variants = doc["variants"]
    rows = "\n".join(f"| {i + 1} | {w:.1f} |" for i, w in enumerate(walls))
    table = "\n".join(
        f"| {label} | {v['runtime']} | {100 * v['accuracy']:.2f} | {v['file_bytes'] or '—'} | {v['latency_ms_median']:.3f} | {v['latency_ms_p90']:.3f} |"
        for label, v in variants.items()
    )
    text = f"""# `deepshrink demo` wall time

{provenance("python bench/demo_wall.py --repeats " + str(args.repeats), threads=1)}
- whole process, from start to exit, including imports, training, export and measurement

| run | wall s |
|---:|---:|
{rows}

Median {statistics.median(walls):.1f} s (target: <= 60 s).

Variants of the last run (test split of digits: 359 images; latency at batch 1, 1 thread, interleaved):

| variant | runtime | accuracy % | file bytes | latency median ms | p90 ms |
|---|---|---:|---:|---:|---:|
{table}

Checks of the last run: `{json.dumps(checks)}`
"""
    (REPO / "bench" / "results" / "demo.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
