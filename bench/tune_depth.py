"""The streamed tuning's peak GPU memory against the depth, for a large layer shape, without a measurement.

    python bench/tune_depth.py [--shape llama3-70b] [--layers 2 4] [--out bench/results/tune-depth-h100.json]

bench/scale.py measures the tuning after its measurement and allocation, which take ~1 min a 70B-shaped layer;
here each model (random weights in the shape, written by scale.write_model) is quantized with one fixed option per
block at ~4 bits on 4 rows, then tuned for 3 steps of 2 rows on 100 × 2048 random rows with its layers streamed
(as a model of the real depth is). What a layer adds is its input of the step's rows, kept for the backward pass;
two depths above one give that slope (a one-layer model's backward computes no gradient for its layer's input).
The slope is taken from the tuning's own memory, its peak less what the process held when it began (most likely
cuBLAS workspaces, one per stream the quantization used, 32 MiB each on the H100: more in one run than in
another), and the extrapolation adds back what the deepest run held before.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from scale import SHAPES, write_model

from exlbuild.quant.exl2.convert import quantize_model
from exlbuild.quant.exl2.options import ATTN_CANDIDATES, MLP_CANDIDATES
from exlbuild.quant.exl2.tune import tune_model

OPTION = 4  # the candidate of each block's table used for every layer (~4 bits)


def fixed_strategy(layers: int) -> dict[str, dict]:
    strategy = {}
    for i in range(layers):
        strategy[f"model.layers.{i}.self_attn"] = dict(zip(ATTN_CANDIDATES.projections,
                                                           ATTN_CANDIDATES.candidates[OPTION]))
        strategy[f"model.layers.{i}.mlp"] = dict(zip(MLP_CANDIDATES.projections, MLP_CANDIDATES.candidates[OPTION]))
    return strategy


def measure(shape: str, layers: int, rows: int, length: int, work: Path, device: str) -> dict:
    vocab = SHAPES[shape]["vocab_size"]
    write_model(work / "model", shape, layers, device)
    ids = torch.randint(0, vocab, (4, length), generator=torch.Generator().manual_seed(1))
    quantize_model(work / "model", ids, fixed_strategy(layers), 6, work / "quantized", device=device)
    ids = torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(0))
    cuda = device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else 0
    started = time.perf_counter()
    tune_model(work / "model", work / "quantized", work / "tuned", ids, steps=3, lr=1e-3, rows_per_step=2,
               device=device, stream_layers=True)
    return {"shape": shape, "layers": layers, "rows": rows, "length": length,
            "seconds": time.perf_counter() - started,
            "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda else 0, "allocated_before_bytes": before}


def summary(runs: list[dict], real_layers: int) -> dict:
    """The runs, the tuning's own bytes a layer (the slope of peak less what was held before), and the peak at the
    real depth: the deepest run's own peak plus that slope for each further layer, plus what it held before."""
    first, last = runs[0], runs[-1]

    def own(run: dict) -> int:
        return run["peak_gpu_bytes"] - run["allocated_before_bytes"]

    per_layer = (own(last) - own(first)) / (last["layers"] - first["layers"])
    peak = own(last) + (real_layers - last["layers"]) * per_layer + last["allocated_before_bytes"]
    return {"runs": runs, "per_layer_bytes": per_layer,
            "extrapolated": {"layers": real_layers, "peak_gpu_bytes": peak}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-70b", choices=list(SHAPES))
    ap.add_argument("--layers", nargs="+", type=int, default=[2, 4])
    ap.add_argument("--rows", type=int, default=100)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--work", type=Path, default=Path("/tmp/exlbuild-tune-depth"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "tune-depth-h100.json")
    args = ap.parse_args()
    runs = []
    for layers in args.layers:
        work = args.work / f"{args.shape}-{layers}"
        runs.append(measure(args.shape, layers, args.rows, args.length, work, args.device))
        shutil.rmtree(work)
        print(json.dumps(runs[-1]), flush=True)
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              **summary(runs, SHAPES[args.shape]["layers"])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["extrapolated"]))


if __name__ == "__main__":
    main()
