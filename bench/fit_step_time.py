"""The refinement's and the tuning's time a step at the recipe's defaults, and a digest of what each writes, for
whatever exlbuild is imported: to compare two versions of the code on one machine, install the other one aside
(`pip install --no-deps --target DIR SOURCE`) and run this once with PYTHONPATH=DIR and once without, on the same
--work directory (the random model and its quantization pass are made by the first run and reused).

    python bench/fit_step_time.py OUT.json [--work /tmp/exlbuild-fit-step] [--layers 4]

A random model of SmolLM2-shaped layers (bench/scale.py), 100 × 2048 rows, quantized with one fixed option per block
(bench/fit_profile.py's `random_fits`); the refinement at 300 steps of 2 rows (rate 0.01), the tuning at 100 steps of
2 rows. Each fit runs once untimed (compiles, allocator), then twice at 0 steps and twice at its steps (`timed_fit`):
ms a step = (best at its steps − best at 0) / steps, a refinement step being one layer's. bench/fit_profile.py lists
where such a step's time goes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from fit_profile import random_fits, timed_fit

import exlbuild


def digest(directory: Path) -> str:
    """The first 16 hex digits of sha256 over the directory's files, in path order."""
    h = hashlib.sha256()
    for f in sorted(directory.rglob("*")):
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp/exlbuild-fit-step"))
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    fits = random_fits(args.work, "smollm2", args.layers, 100, 2048, "cuda", refine_rows_per_step=2, reuse=True)
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(), "exlbuild": exlbuild.__file__}
    for name, steps in (("refine", 300), ("tune", 100)):
        timing = timed_fit(name, fits[name], steps, args.layers, args.work, torch.cuda.synchronize, repeats=2)
        report[name] = {**timing, "bytes": digest(args.work / f"{name}-{steps}")}
        print(name, json.dumps(report[name]), flush=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
