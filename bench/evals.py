"""Perplexity of a built recipe's FP16 model and of every variant on several texts: bench/results/quality-*.json.

    python bench/evals.py WORK/smollm2-sweep.yaml OUT.json c4.txt wiki.txt heldout.txt NEWS.txt [--set KEY=VALUE ...]

The recipe is the one bench/sweep.py copied into its --work folder, already built (with the same `--set`
overrides as the sweep's, where they change the model or the variants); the model and the compiled directories
are found through `exlbuild status --json`, as bench/sweep.py finds its steps. Each text is scored under its file
name's stem, in windows of `--window` tokens, at most `--max-windows` of them, on the GPU if there is one. The texts
of bench/results/quality-h100.md: exllamav2 0.3.2's bundled C4 and Wikipedia samples
(conversion/standard_cal_data/c4.utf8 and wiki.utf8 in its wheel; for evaluation only), bench/heldout_text.py's
held-out articles, and Python 3.11's idlelib/NEWS.txt (the GPU machine's Python has no idlelib: carry it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from exlbuild.eval import evaluate
from exlbuild.rules.exl2 import compute_device


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("texts", type=Path, nargs="+")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--max-windows", type=int, default=120)
    args = ap.parse_args()

    status = json.loads(subprocess.run([sys.executable, "-m", "exlbuild.cli", "status", str(args.recipe), "--json",
                                        *args.overrides], check=True, capture_output=True, text=True).stdout)
    models = {"model" if t["kind"] == "model" else t["name"]: Path(t["out_dir"])
              for t in status["targets"] if t["kind"] in ("model", "compiled")}
    results: dict[str, dict] = {}
    for name, directory in models.items():
        for text in args.texts:
            result = evaluate(directory, text, window=args.window, max_windows=args.max_windows,
                              device=compute_device())
            results.setdefault(name, {})[text.stem] = result
            print(name, text.stem, json.dumps(result), flush=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    fp16 = results.pop("model")
    print("| variant | " + " | ".join(t.stem for t in args.texts) + " |")
    print("| --- |" + " ---: |" * len(args.texts))
    for name, row in results.items():
        ratios = (row[t.stem]["perplexity"] / fp16[t.stem]["perplexity"] for t in args.texts)
        print(f"| {name} | " + " | ".join(f"×{r:.3f}" for r in ratios) + " |")


if __name__ == "__main__":
    main()
