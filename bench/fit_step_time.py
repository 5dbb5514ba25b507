"""The refinement's and the tuning's time a step at the recipe's defaults, and a digest of what each writes, for
whatever exlbuild is imported: to compare two versions of the code on one machine, install the other one aside
(`pip install --no-deps --target DIR SOURCE`) and run this once with PYTHONPATH=DIR and once without, on the same
--work directory (the random model and its quantization pass are made by the first run and reused).

    python bench/fit_step_time.py OUT.json [--work /tmp/exlbuild-fit-step] [--layers 4]

A random model of SmolLM2-shaped layers (bench/scale.py), 100 × 2048 rows, quantized with one fixed option per block
(bench/tune_depth.py); the refinement at 300 steps of 2 rows (rate 0.01), the tuning at 100 steps of 2 rows. Each fit
runs once untimed (compiles, allocator), then twice at 0 steps and twice at its steps: ms a step = (best at its steps
− best at 0) / steps, a refinement step being one layer's. bench/fit_profile.py lists where such a step's time goes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch
from scale import SHAPES, write_model
from tune_depth import fixed_strategy

from exlbuild.quant.exl2.convert import quantize_model
from exlbuild.quant.exl2.refine import refine_model
from exlbuild.quant.exl2.tune import tune_model


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
    work, layers = args.work, args.layers
    ids = torch.randint(0, SHAPES["smollm2"]["vocab_size"], (100, 2048), generator=torch.Generator().manual_seed(0))
    if not (work / "quantized").exists():
        write_model(work / "model", "smollm2", layers, "cuda")
        quantize_model(work / "model", ids, fixed_strategy(layers), 6, work / "quantized", device="cuda")

    def refine(out: Path, steps: int) -> dict[str, Any]:
        return refine_model(work / "model", work / "quantized", out, ids, steps, 0.01, 2, device="cuda")

    def tune(out: Path, steps: int) -> dict[str, Any]:
        return tune_model(work / "model", work / "quantized", out, ids, steps=steps, lr=1e-3, rows_per_step=2,
                          device="cuda")

    def timed(fit: Callable[[Path, int], Any], out: Path, steps: int) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        fit(out, steps)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    import exlbuild

    report: dict[str, Any] = {"device": torch.cuda.get_device_name(), "exlbuild": exlbuild.__file__}
    for name, fit, steps, per_step in (("refine", refine, 300, layers), ("tune", tune, 100, 1)):
        first = timed(fit, work / f"{name}-first", steps)
        runs: dict[int, list[float]] = {0: [], steps: []}
        for n in (0, steps, 0, steps):
            runs[n].append(timed(fit, work / f"{name}-{n}", n))
        report[name] = {"first_s": first, "zero_steps_s": runs[0], "steps_s": runs[steps],
                        "ms_per_step": (min(runs[steps]) - min(runs[0])) / (steps * per_step) * 1e3,
                        "bytes": digest(work / f"{name}-{steps}")}
        print(name, json.dumps(report[name]), flush=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
