"""Does a variant's quantization pass depend on the order of its sums? The CPU's stand-in for another machine.

    python bench/order_of_sums.py RECIPE_DIR VARIANT OUT.json [--dtype float32|float64]

Reads a built recipe's exlbuild.lock (RECIPE_DIR holds it) for VARIANT's quantized target: its model, calibration
and allocation. Runs the quantization pass twice from them, in `--dtype`: as the build runs it, and with the
calibration rows reversed, the block passes one row at a time and one thread (every sum over rows in another order,
other matrix product shapes). Writes how many layer files came out identical, and in the second run's files how many
codes differ (bench/results/cpu-vs-gpu.md, session 38). In float32 the two orders round some of GPTQ's decisions
differently, as two machines do; in float64 (`passes.dtype`) they should not.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from exlbuild.quant import stream
from exlbuild.quant.exl2.convert import quantize_model, strategy_from_json
from exlbuild.rules.exl2 import STRATEGY_FILE, load_ids


def quantized_target(recipe_dir: Path, variant: str) -> tuple[dict[str, Path], dict]:
    """The artifact directories of `variant`'s quantized target's inputs, by input name, and its parameters, from
    the lock file."""
    recipes = json.loads((recipe_dir / "exlbuild.lock").read_text())["recipes"]
    (entry,) = recipes.values()  # one recipe per directory here
    by_key = {t["key"]: Path(t["out_dir"]) for t in entry["targets"].values()}
    key_inputs = entry["targets"][f"{variant}/quantized"]["key_inputs"]
    return {name: by_key[key] for name, key in key_inputs["deps"].items()}, key_inputs["params"]


def run(inputs: dict[str, Path], params: dict, ids: torch.Tensor, dtype: torch.dtype, out: Path) -> float:
    allocation = json.loads((inputs["allocation"] / STRATEGY_FILE).read_text())
    started = time.perf_counter()
    quantize_model(inputs["model"], ids, strategy_from_json(allocation["strategy"]), params["head_bits"], out,
                   rope_scale=params["rope"]["scale"], rope_alpha=params["rope"]["alpha"], dtype=dtype)
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe_dir", type=Path)
    ap.add_argument("variant")
    ap.add_argument("out", type=Path)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    inputs, params = quantized_target(args.recipe_dir, args.variant)
    ids = load_ids(inputs["calibration"])
    with tempfile.TemporaryDirectory() as tmp:
        first, second = Path(tmp) / "as-built", Path(tmp) / "other-order"
        seconds = [run(inputs, params, ids, dtype, first)]
        threads, stream.CHUNK_ELEMENTS = torch.get_num_threads(), 1
        torch.set_num_threads(1)
        seconds.append(run(inputs, params, ids.flip(0), dtype, second))
        torch.set_num_threads(threads)
        files = sorted(p.relative_to(first) for p in first.rglob("*.safetensors"))
        same = [p for p in files if (first / p).read_bytes() == (second / p).read_bytes()]
        codes = {"differ": 0, "of": 0}  # packed q_weight words, a proxy for codes
        for p in files:
            a, b = load_file(str(first / p)), load_file(str(second / p))
            for name in a:
                if name.endswith("q_weight"):
                    codes["differ"] += int((a[name] != b[name]).sum())
                    codes["of"] += a[name].numel()
    result = {"variant": args.variant, "dtype": args.dtype, "files": len(files), "identical_files": len(same),
              "differing_q_weight_words": codes["differ"], "q_weight_words": codes["of"], "seconds": seconds}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
