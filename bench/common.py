"""What every benchmark table states: command, commit, date, CPU model, threads."""
from __future__ import annotations

import datetime
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
OUTPUTS = ("bench/artifacts/", "bench/results/")
sys.path.insert(0, str(REPO / "src"))


def provenance(command: str, threads: int | None = None) -> str:
    from deepshrink.core.cpu import cpu_info
    from deepshrink.pipeline.metrics_doc import versions

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True).stdout
    # what the benchmarks write (their tables and artifacts) is output, not the code that ran
    dirty = [line for line in status.splitlines() if not line[3:].startswith(OUTPUTS)]
    pkgs = ", ".join(f"{k} {v}" for k, v in versions().items() if k != "deepshrink")
    lines = [
        f"- command: `{command}`",
        f"- commit: `{commit}`{' (with uncommitted changes)' if dirty else ''}",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- CPU: {cpu_info().describe()}, {os.cpu_count()} cores — features read from /proc/cpuinfo",
        f"- what that means: {cpu_info().int8_caveat()}",
        f"- packages: {pkgs}",
        f"- load average at start (1/5/15 min): {' / '.join(f'{v:.1f}' for v in os.getloadavg())} on {os.cpu_count()} cores"
        + (" — above the core count other work shared the CPU: absolute times are inflated, in-run interleaved ratios less so"
           if max(os.getloadavg()) > (os.cpu_count() or 1) else ""),
    ]
    if threads is not None:
        lines.append(f"- threads: {threads}")
    return "\n".join(lines)


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign (McNemar) test: the chance of a split at least this uneven of the
    ``wins + losses`` samples on which two files differ, if neither were the better (ties left out)."""
    n, k = wins + losses, min(wins, losses)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)
