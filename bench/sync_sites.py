"""Where the quantization pass and the fits' fixed parts make the host wait for the GPU: each is run once with
PyTorch's sync debug mode on (torch.cuda.set_sync_debug_mode("warn")), and every synchronizing call is counted by
the exlbuild line it came from. A wait is free where the GPU has nothing queued and costs the whole backlog where
it has: this lists the places, bench/fit_profile.py the time.

    python bench/sync_sites.py [--shape smollm2] [--layers 2] --out /tmp/sync-sites.txt

Runs on a random model in a real layer shape (bench/fit_profile.py's `random_fits`), after one untimed run of each
(so that first-call work is not counted). The fits run 0 steps: their steps replay CUDA graphs, which cannot wait.
"""

from __future__ import annotations

import argparse
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch

from fit_profile import random_fits


def sync_sites(run) -> Counter[str]:
    """The exlbuild (or kernels) line of every synchronizing call made by `run()`, counted."""
    sites: Counter[str] = Counter()

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        frames = [f for f in traceback.extract_stack() if "/exlbuild/" in f.filename or "/kernels/" in f.filename]
        site = frames[-1] if frames else traceback.extract_stack()[-3]
        sites[f"{Path(site.filename).parent.name}/{Path(site.filename).name}:{site.lineno} {site.name}"] += 1

    with warnings.catch_warnings():  # restores the filters and showwarning afterwards
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sites


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="smollm2")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rows", type=int, default=100)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--work", type=Path, default=Path("/tmp/exlbuild-sync-sites"))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    fits = random_fits(args.work, args.shape, args.layers, args.rows, args.length, "cuda")
    report = [f"{args.shape}, {args.layers} layers, {args.rows} x {args.length} rows, {torch.cuda.get_device_name()}"]
    for name, fit in fits.items():
        fit(args.work / f"{name}-first", 0)
        sites = sync_sites(lambda: fit(args.work / f"{name}-synced", 0))
        report += ["", f"## {name} (0 steps): {sum(sites.values())} synchronizing calls at {len(sites)} lines",
                   *(f"{count:7d}  {site}" for site, count in sites.most_common(40))]
        print("\n".join(report[-3:]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(report) + "\n")


if __name__ == "__main__":
    main()
