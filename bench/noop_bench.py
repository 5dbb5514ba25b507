"""Time a no-op rebuild: every target up to date (stat cache, no torch import).

    python bench/noop_bench.py RECIPE [overrides ...]   (build the recipe once first)
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time


def main() -> None:
    cmd = [sys.executable, "-m", "exlbuild.cli", *sys.argv[1:], "-q"]
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        times.append(time.perf_counter() - t0)
    print(f"no-op rebuild: median {statistics.median(times):.3f} s, min {min(times):.3f} s over {len(times)} runs")


if __name__ == "__main__":
    main()
