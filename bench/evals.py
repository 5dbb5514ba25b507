"""Perplexity of a built recipe's FP16 model and of every variant on several texts: bench/results/quality-*.json.

    python bench/evals.py WORK/smollm2-sweep.yaml OUT.json c4.txt wiki.txt heldout.txt NEWS.txt [--set KEY=VALUE ...]

The recipe is the one bench/sweep.py copied into its --work folder, already built (with the sweep's overrides as
`--set`: those that change the model or the variants, and eval.text, which `status` resolves too); the model and the
compiled directories are found through `exlbuild status --json`, as bench/sweep.py finds its steps. Each text is
scored under its file name's stem, in windows of `--window` tokens, at most `--max-windows` of them, on the GPU if there
is one. The texts of bench/results/quality-h100.md: exllamav2 0.3.2's bundled C4 and Wikipedia samples
(conversion/standard_cal_data/c4.utf8 and wiki.utf8 in its wheel; for evaluation only), bench/heldout_text.py's
held-out articles, and Python 3.11's idlelib/NEWS.txt (the GPU machine's Python has no idlelib: carry it).

--exllamav2-bits B ...: also the reference converter's own EXL2 of the same FP16 model (exllamav2 0.3.2 installed:
bench/gpu_setup.sh exllamav2), with its default calibration: one measurement pass, then each bitrate from it with
the head at --head-bits, as its documentation's sweep does; scored as `exllamav2-Bbpw` beside exlbuild's variants
through the same reader, and each conversion's wall time under "exllamav2-seconds".
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from exlbuild.eval import evaluate
from exlbuild.rules.exl2 import compute_device


def exllamav2_variants(model_dir: Path, work: Path, bits: list[float], head_bits: int
                       ) -> tuple[dict[str, Path], dict[str, float]]:
    """exllamav2's converter on the FP16 model in `model_dir`: its measurement, then each of `bits` from it, in
    `work`; the output directories by name (exllamav2-Bbpw), and each step's wall time by name."""
    convert = [sys.executable, "-m", "exllamav2.conversion.convert_exl2", "-i", str(model_dir), "-o", str(work / "job"),
               "-nr"]
    measurement = work / "measurement.json"
    steps = {"measurement": ["-om", str(measurement)]}
    for b in bits:
        steps[f"exllamav2-{b}bpw"] = ["-m", str(measurement), "-b", str(b), "-hb", str(head_bits),
                                      "-cf", str(work / f"exllamav2-{b}bpw")]
    work.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    for name, args in steps.items():
        t0 = time.perf_counter()
        run = subprocess.run(convert + args, capture_output=True, text=True)
        (work / f"{name}.log").write_text(run.stdout[-20000:] + run.stderr[-20000:])
        if run.returncode != 0:
            raise SystemExit(f"exllamav2's converter failed at {name} (log: {work / f'{name}.log'}):\n"
                             f"{run.stderr[-3000:]}")
        seconds[name] = round(time.perf_counter() - t0, 1)
        print(f"exllamav2 {name}: {seconds[name]} s", flush=True)
    return {name: work / name for name in steps if name != "measurement"}, seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("texts", type=Path, nargs="+")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--max-windows", type=int, default=120)
    ap.add_argument("--exllamav2-bits", type=float, nargs="+", default=[], metavar="B")
    ap.add_argument("--exllamav2-work", type=Path, default=Path("/tmp/exllamav2-reference"))
    ap.add_argument("--head-bits", type=int, default=6, help="the reference's lm_head bits (with --exllamav2-bits)")
    args = ap.parse_args()

    status = json.loads(subprocess.run([sys.executable, "-m", "exlbuild.cli", "status", str(args.recipe), "--json",
                                        *args.overrides], check=True, capture_output=True, text=True).stdout)
    models = {"model" if t["kind"] == "model" else t["name"]: Path(t["out_dir"])
              for t in status["targets"] if t["kind"] in ("model", "compiled")}
    seconds: dict[str, float] = {}
    if args.exllamav2_bits:
        reference, seconds = exllamav2_variants(models["model"], args.exllamav2_work, args.exllamav2_bits,
                                                args.head_bits)
        models.update(reference)
    results: dict[str, dict] = {}
    for name, directory in models.items():
        for text in args.texts:
            result = evaluate(directory, text, window=args.window, max_windows=args.max_windows,
                              device=compute_device())
            results.setdefault(name, {})[text.stem] = result
            print(name, text.stem, json.dumps(result), flush=True)
    report = {**results, "exllamav2-seconds": seconds} if seconds else results
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    fp16 = results.pop("model")
    print("| variant | " + " | ".join(t.stem for t in args.texts) + " |")
    print("| --- |" + " ---: |" * len(args.texts))
    for name, row in results.items():
        ratios = (row[t.stem]["perplexity"] / fp16[t.stem]["perplexity"] for t in args.texts)
        print(f"| {name} | " + " | ".join(f"×{r:.3f}" for r in ratios) + " |")


if __name__ == "__main__":
    main()
