"""Fuzz the loading path of ``deepshrink evaluate`` with corrupted .pte / .onnx / .safetensors / .dsk files.

    .venv/bin/python bench/fuzz_artifacts.py               # 10,000 cases
    .venv/bin/python bench/fuzz_artifacts.py --cases 2000  # fewer (the table says how many)

Writes bench/results/fuzz_artifacts.md. Each case is one file: random bytes (half of them behind
the first bytes of a valid file, so they pass the magic checks), a truncated copy of a valid file
(cut at a random length), or a copy with 1-8 random bits flipped. The valid files are tiny (a
Linear 784->10 model exported to .pte and .onnx, a seed-mlp with 8 hidden units saved as
.safetensors and .dsk). Cases go through what the CLI's ``evaluate`` calls, in-process:
``open_runner(path, isolate=True)`` (the .pte / .onnx first loaded once in the probe worker), then
one batch of 8 digits through the runner. A driver process runs the cases and reports each; if it
dies (a crash the isolation missed) or stops answering within ``--timeout`` seconds (a hang), the
case is counted as such and a fresh driver continues with the next case.

Outcomes: ``refused`` — a deepshrink error of one line (what the CLI turns into ``deepshrink:
error:`` and exit 2); ``loaded`` — the file still loads and runs (bit flips in weights);
``unclean`` — any other exception (a traceback); ``crash`` / ``hang`` as above; ``noisy`` counts
cases that wrote anything to stderr (a runtime's log line would break the one-line promise).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import select
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from common import REPO, provenance

RESULT = REPO / "bench" / "results" / "fuzz_artifacts.md"
FORMATS = ("pte", "onnx", "safetensors", "dsk")
MUTATIONS = ("random", "random-after-valid-prefix", "truncated", "bit-flips")


def build_valid(directory: Path) -> None:
    import torch
    from torch import nn

    from deepshrink.deploy import export
    from deepshrink.models import create, save_checkpoint

    torch.manual_seed(0)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).eval()
    for fmt in ("pte", "onnx"):
        export(linear, directory / f"valid.{fmt}", example_input=torch.randn(4, 1, 28, 28))
        (directory / f"valid.{fmt}.json").unlink()   # the cases corrupt the artifact, not its sidecar
    mlp = create("seed-mlp", hidden=[8])
    for fmt in ("safetensors", "dsk"):
        save_checkpoint(mlp, directory / f"valid.{fmt}")


def case(seed: int, index: int, valid: dict[str, bytes]) -> tuple[str, str, bytes]:
    """(format, mutation, bytes) of case ``index``: the same for every run with this seed."""
    rng = random.Random(seed * 1_000_003 + index)
    fmt = FORMATS[index % len(FORMATS)]
    base = valid[fmt]
    roll = rng.random()
    if roll < 0.2:
        return fmt, "random", rng.randbytes(rng.randrange(0, 2 * len(base)))
    if roll < 0.4:
        prefix = base[:rng.randrange(8, 65)]
        return fmt, "random-after-valid-prefix", prefix + rng.randbytes(rng.randrange(0, len(base)))
    if roll < 0.8:
        return fmt, "truncated", base[:rng.randrange(len(base))]
    data = bytearray(base)
    for _ in range(rng.randint(1, 8)):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return fmt, "bit-flips", bytes(data)


def drive(directory: Path, seed: int, start: int, stop: int) -> None:
    """Run cases ``start..stop-1``, one JSON line each on stdout (stderr goes to a file we watch)."""
    noise = open(directory / f"stderr-{start}.log", "w+b")
    os.dup2(noise.fileno(), 2)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    from deepshrink.core import samples as S
    from deepshrink.core.errors import DeepshrinkError
    from deepshrink.data import load
    from deepshrink.evaluation.runners import open_runner

    test = load("digits").test
    batch = S.stack([test[i][0] for i in range(8)])
    valid = {fmt: (directory / f"valid.{fmt}").read_bytes() for fmt in FORMATS}
    for fmt in FORMATS:   # imports and first-call logs of the runtimes (the CLI mutes them) happen here, not in a case
        open_runner(directory / f"valid.{fmt}", threads=1, isolate=True).predict_all(batch)
    for index in range(start, stop):
        fmt, mutation, data = case(seed, index, valid)
        path = directory / f"case-{index % 2}.{fmt}"
        path.write_bytes(data)
        before = noise.seek(0, os.SEEK_END)
        started = time.perf_counter()
        error = ""
        try:
            runner = open_runner(path, threads=1, isolate=True)
            runner.predict_all(batch)
            outcome = "loaded"
        except DeepshrinkError as err:
            outcome = "refused" if "\n" not in str(err) else "unclean"
            error = type(err).__name__
        except Exception as err:  # what this bench is here to find
            outcome, error = "unclean", f"{type(err).__name__}: {str(err)[:200]}"
        sys.stderr.flush()
        noisy = noise.seek(0, os.SEEK_END) > before
        print(json.dumps({"index": index, "format": fmt, "mutation": mutation, "outcome": outcome, "error": error,
                          "noisy": noisy, "seconds": time.perf_counter() - started}), flush=True)


def run_all(directory: Path, seed: int, cases: int, timeout: float) -> list[dict]:
    results: list[dict] = []
    valid = {fmt: (directory / f"valid.{fmt}").read_bytes() for fmt in FORMATS}
    index = 0
    while index < cases:
        driver = subprocess.Popen([sys.executable, __file__, "--drive", str(directory), "--seed", str(seed),
                                   "--start", str(index), "--cases", str(cases)], stdout=subprocess.PIPE)
        pending, last = b"", time.monotonic()
        # the first answer includes importing torch and the runtimes, and starting the probe worker
        limit = timeout + 300
        while index < cases:
            ready, _, _ = select.select([driver.stdout], [], [], 1.0)
            if ready:
                chunk = os.read(driver.stdout.fileno(), 65536)
                if not chunk:   # the driver died inside case `index`
                    code = driver.wait()
                    fmt, mutation, _ = case(seed, index, valid)
                    results.append({"index": index, "format": fmt, "mutation": mutation, "outcome": "crash",
                                    "error": f"driver exit {code}", "noisy": True, "seconds": 0.0})
                    index += 1
                    break
                pending += chunk
                while b"\n" in pending:
                    line, _, pending = pending.partition(b"\n")
                    results.append(json.loads(line))
                    index = results[-1]["index"] + 1
                    last, limit = time.monotonic(), timeout
                    if index % 500 == 0:
                        print(f"  {index} cases, {Counter(r['outcome'] for r in results)}", file=sys.stderr)
            elif time.monotonic() - last > limit:
                driver.kill()
                driver.wait()
                fmt, mutation, _ = case(seed, index, valid)
                results.append({"index": index, "format": fmt, "mutation": mutation, "outcome": "hang",
                                "error": f"no answer within {limit:.0f} s", "noisy": False, "seconds": limit})
                index += 1
                break
        driver.stdout.close()
        if driver.poll() is None:
            driver.wait()
    return results


def table(results: list[dict], cases: int, requested: int, seconds: float, command: str, seed: int) -> str:
    outcomes = ("refused", "loaded", "unclean", "crash", "hang")
    lines = [
        "# Fuzzing the loading path of `deepshrink evaluate`",
        "",
        provenance(command, threads=1),
        f"- cases: {cases:,}" + (f" (of the {requested:,} asked for)" if cases != requested else "")
        + f", seed {seed}; wall time {seconds / 60:.1f} min",
        "",
        "Each case is one corrupted file taken through `open_runner(path, isolate=True)` and one batch of 8 "
        "digits: what `deepshrink evaluate FILE` does before measuring. `refused`: a deepshrink error of one line "
        "(the CLI prints it as `deepshrink: error: ...` and exits 2). `loaded`: the file still loads and runs "
        "(bits flipped in weights). `unclean`: any other exception. `crash` / `hang`: the process running the "
        "cases died or stopped answering. `noisy`: something was written to stderr besides the error.",
        "",
        "| format | mutation | cases | refused | loaded | unclean | crash | hang | noisy |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for fmt in FORMATS:
        for mutation in MUTATIONS:
            rows = [r for r in results if r["format"] == fmt and r["mutation"] == mutation]
            if rows:
                count = Counter(r["outcome"] for r in rows)
                lines.append(f"| .{fmt} | {mutation} | {len(rows):,} | " + " | ".join(f"{count[o]:,}" for o in outcomes)
                             + f" | {sum(r['noisy'] for r in rows):,} |")
    total = Counter(r["outcome"] for r in results)
    lines.append(f"| **all** | | **{len(results):,}** | " + " | ".join(f"**{total[o]:,}**" for o in outcomes)
                 + f" | **{sum(r['noisy'] for r in results):,}** |")
    errors = Counter(r["error"] for r in results if r["outcome"] == "refused")
    lines += ["", "Error classes of the refusals: " + ", ".join(f"{name} {n:,}" for name, n in errors.most_common()) + "."]
    if errors["ProbeCrashed"] or errors["ProbeHung"]:
        lines += ["", f"`ProbeCrashed` ({errors['ProbeCrashed']:,}) / `ProbeHung` ({errors['ProbeHung']:,}): the runtime "
                      "crashed (or hung) on the file inside the probe worker, which was replaced; without that "
                      "isolation each of these would have ended the process."]
    bad = [r for r in results if r["outcome"] in ("unclean", "crash", "hang") or r["noisy"]]
    if bad:
        lines += ["", "Cases that were not clean (format, mutation, case index, what happened):", ""]
        lines += [f"- .{r['format']} {r['mutation']} #{r['index']}: {r['outcome']}{' (noisy)' if r['noisy'] else ''} "
                  f"{r['error']}" for r in bad[:30]]
        if len(bad) > 30:
            lines.append(f"- ... and {len(bad) - 30} more")
    slow = sorted(results, key=lambda r: -r["seconds"])[:1]
    if slow:
        lines += ["", f"Slowest case: {slow[0]['seconds']:.2f} s (.{slow[0]['format']} {slow[0]['mutation']}, "
                      "includes starting the probe worker when it is the first or follows a crash)."]
    return "\n".join(lines) + "\n"


SEED = 0   # the seed of the committed table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds a case may take before it counts as a hang")
    parser.add_argument("--drive", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drive:
        drive(Path(args.drive), args.seed, args.start, args.cases)
        return
    command = "python bench/fuzz_artifacts.py" + (f" --cases {args.cases}" if args.cases != 10_000 else "")
    with tempfile.TemporaryDirectory(prefix="deepshrink-fuzz-") as tmp:
        directory = Path(tmp)
        build_valid(directory)
        started = time.monotonic()
        results = run_all(directory, args.seed, args.cases, args.timeout)
        seconds = time.monotonic() - started
    RESULT.write_text(table(results, len(results), args.cases, seconds, command, args.seed))
    print(RESULT.read_text())


if __name__ == "__main__":
    main()
