"""Run every benchmark in turn (each writes its table under bench/results/). `make bench`.

Long: tens of minutes on 2 cores. Each script can also be run alone; see its docstring.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["baselines.py", "demo_wall.py", "ort_int8.py", "pruning.py", "structured.py", "quant_int8.py", "quant_lowbit.py", "mobile_int8.py", "deep_compression.py", "lowbit_pte.py", "repairs.py", "qat_passes.py", "shipped.py", "examples.py", "ddp.py", "fuzz_artifacts.py"]


def main() -> int:
    for script in SCRIPTS:
        if not (HERE / script).is_file():
            print(f"skipping {script}: not present")
            continue
        print(f"== {script}", flush=True)
        code = subprocess.call([sys.executable, str(HERE / script)], cwd=HERE.parent)
        if code:
            print(f"{script} failed with exit code {code}")
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
