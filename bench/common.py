"""What every benchmark table states: command, commit, date, CPU model, threads."""
from __future__ import annotations

import datetime
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO / "src"))


def provenance(command: str, threads: int | None = None) -> str:
    from deepshrink.pipeline.metrics_doc import cpu_model, versions

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    pkgs = ", ".join(f"{k} {v}" for k, v in versions().items() if k != "deepshrink")
    lines = [
        f"- command: `{command}`",
        f"- commit: `{commit}`{' (with uncommitted changes)' if dirty else ''}",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- CPU: {cpu_model()} (2 cores; AVX-512 VNNI and AMX: int8 gains here overstate ARM phones)",
        f"- packages: {pkgs}",
    ]
    if threads is not None:
        lines.append(f"- threads: {threads}")
    return "\n".join(lines)
