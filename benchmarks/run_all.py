"""Run every benchmark (``benchmarks/bench_*.py``) in its own process and print their reports.

Usage: ``.venv/bin/python benchmarks/run_all.py [NAME ...]`` (names like ``io`` or ``generate``).
Each benchmark measures its own baseline in the same run and prints ratios against it.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent


def main(argv: list[str]) -> int:
    wanted = set(argv)
    scripts = sorted(p for p in HERE.glob("bench_*.py") if not wanted or p.stem[6:] in wanted)
    failed = []
    for script in scripts:
        print(f"\n=== {script.stem} ===", flush=True)
        t = time.perf_counter()
        rc = subprocess.call([sys.executable, str(script)])
        print(f"--- {script.stem}: exit {rc}, {time.perf_counter() - t:.1f} s", flush=True)
        if rc:
            failed.append(script.stem)
    if failed:
        print("\nfailed: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
