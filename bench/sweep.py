"""The full sweep of a recipe on the GPU machine: one measurement, then every variant; times, peak GPU memory
and perplexities into bench/results/sweep-<name>.json and a markdown table beside it.

    python bench/sweep.py recipes/smollm2-sweep.yaml --name h100 [--jobs N] [--compile-log LOG.json]
        [--chunk-elements N [--pass-precision MODE]] [overrides ...]

The build runs through the CLI in a fresh store (so every step is really built) and its wall time is the
`total_seconds`; each step's own time and peak GPU memory come from its artifact's manifest.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEP_KINDS = ("model", "calibration", "measurement", "allocation", "quantized", "compiled", "report")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe", type=Path)
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--name", required=True, help="results file suffix, e.g. h100")
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--work", type=Path, default=None, help="build here (default: a temporary folder)")
    ap.add_argument("--jobs", type=int, default=1, help="exlbuild -j: targets built at once")
    ap.add_argument("--compile-log", type=Path, default=None,
                    help="build through compile_log.py, its log of every Triton compile written here")
    ap.add_argument("--chunk-elements", type=int, default=None,
                    help="build through chunked_build.py with the block passes' chunks of this size (another draw)")
    ap.add_argument("--pass-precision", default=None,
                    help="with --chunk-elements: the GPU's calibration passes at this precision (chunked_build.py)")
    args = ap.parse_intermixed_args()  # overrides before or after the options
    if args.compile_log is not None and args.chunk_elements is not None:
        ap.error("--compile-log and --chunk-elements are separate builders: give one")
    if args.pass_precision is not None and args.chunk_elements is None:
        ap.error("--pass-precision is chunked_build.py's: give --chunk-elements too")

    work = args.work or Path(tempfile.mkdtemp(prefix="exlbuild-sweep-"))
    work.mkdir(parents=True, exist_ok=True)
    recipe = work / args.recipe.name
    shutil.copy(args.recipe, recipe)
    cli = [sys.executable, "-m", "exlbuild.cli"]
    t0 = time.perf_counter()
    builder = cli
    if args.compile_log is not None:
        builder = [sys.executable, str(Path(__file__).parent / "compile_log.py"), str(args.compile_log)]
    if args.chunk_elements is not None:
        builder = [sys.executable, str(Path(__file__).parent / "chunked_build.py"), str(args.chunk_elements)]
    env = {**os.environ, "PASS_PRECISION": args.pass_precision} if args.pass_precision else None
    subprocess.run(builder + [str(recipe), "-j", str(args.jobs), *args.overrides], check=True, env=env)
    total = time.perf_counter() - t0

    status = json.loads(subprocess.run(cli + ["status", str(recipe), "--json", *args.overrides], check=True,
                                       capture_output=True, text=True).stdout)
    section = json.loads((work / "exlbuild.lock").read_text())["recipes"][recipe.name]
    store = work / ".exlbuild" / "store"
    steps, report = [], None
    for t in status["targets"]:
        if t["rule"] == "source":
            continue
        manifest = json.loads((store / t["rule"] / t["key"] / "manifest.json").read_text())
        steps.append({"name": t["name"], "kind": t["kind"], "seconds": manifest["seconds"],
                      "started": manifest["started"], "peak_gpu_bytes": manifest["metrics"].get("peak_gpu_bytes"),
                      "fit_steps_seconds": manifest["metrics"].get("seconds_steps")})
        if t["rule"] == "report":
            report = json.loads((Path(t["out_dir"]) / "report.json").read_text())
    first = min(datetime.datetime.fromisoformat(s["started"]) for s in steps)
    for s in steps:  # when each step started, in whole seconds after the first (-j runs several at once)
        s["started_s"] = (datetime.datetime.fromisoformat(s["started"]) - first).total_seconds()
    env = manifest["environment"]
    result = {
        "device": env.get("gpu", "cpu"),
        "model": Path(section["recipe"]["model"]["gguf"] or section["recipe"]["model"]["path"]).name,
        "recipe": args.recipe.name, "overrides": args.overrides, "environment": env,
        "jobs": args.jobs, "steps": steps, "total_seconds": round(total, 1),
        "fp16_perplexity": report and report["fp16_perplexity"],
        "variants": report and report["variants"],
    }
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"sweep-{args.name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    lines = [f"# Sweep on {r['device']}: {r['recipe']} {' '.join(r['overrides'])}".rstrip(), "",
             f"Whole build (fresh store, {r.get('jobs', 1)} at a time): {r['total_seconds']:.1f} s", "",
             "| step | kind | started (s) | seconds | of it, fit steps | peak GPU memory (MiB) |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for s in r["steps"]:
        peak = f"{s['peak_gpu_bytes'] / 2**20:.0f}" if s["peak_gpu_bytes"] else "–"
        fit = f"{s['fit_steps_seconds']:.1f}" if s.get("fit_steps_seconds") is not None else "–"
        lines.append(f"| {s['name']} | {s['kind']} | {s['started_s']:.0f} | {s['seconds']:.1f} | {fit} | {peak} |")
    if r["variants"]:
        lines += ["", f"FP16 perplexity: {r['fp16_perplexity']:.3f}" if r["fp16_perplexity"] else "", "",
                  "| variant | decoder bpw | eval ppl | vs FP16 | calibration ppl |", "| --- | ---: | ---: | ---: | ---: |"]
        for v in r["variants"]:
            ratio = f"{v['perplexity_vs_fp16']:.3f}" if v.get("perplexity_vs_fp16") else "–"
            ppl = f"{v['perplexity']:.3f}" if v.get("perplexity") else "–"
            lines.append(f"| {v['variant']} | {v['decoder_bpw']:.3f} | {ppl} | {ratio} | "
                         f"{v['calibration_perplexity']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
