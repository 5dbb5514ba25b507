"""Peak GPU memory and step time of the refinement (exlbuild.quant.exl2.refine) on one random decoder layer in a
large model's shape (bench/scale.py's models), calibration rows × 2048 tokens.

    python bench/refine_memory.py llama3-70b --rows 100 --steps 10 --out bench/results/refine-memory-70b-h100.json
    python bench/refine_memory.py smollm2 --steps 200 --warmup --out /tmp/refine-step-smollm2.json

The layer is quantized first (candidate 4 of each block, about 4 bits); then refined with `steps` and `2·steps`
steps, so that the difference gives the time of a step without the fixed cost (both models' states, the
held-out checks, writing).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from exlbuild.quant.exl2.convert import quantize_model
from exlbuild.quant.exl2.options import ATTN_CANDIDATES, MLP_CANDIDATES
from exlbuild.quant.exl2.refine import refine_model
from exlbuild.recipe import RefineSpec
from scale import SHAPES, write_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("--rows", type=int, default=100)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rows-per-step", type=int, default=RefineSpec.rows_per_step,
                    help="the recipe's default unless given (results before session 32: 4)")
    ap.add_argument("--weights-per-fit", type=int, default=RefineSpec.weights_per_fit)
    ap.add_argument("--warmup", action="store_true",
                    help="refine once untimed first: on small shapes the first call's one-time costs (kernels' "
                         "first launches, the allocator) would otherwise land in the timed step difference")
    ap.add_argument("--work", type=Path, default=Path("/tmp/refine-memory"))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    started = time.perf_counter()
    write_model(args.work / "model", args.shape, 1, "cuda")
    vocab = json.loads((args.work / "model" / "config.json").read_text())["vocab_size"]
    ids = torch.randint(0, vocab, (args.rows, 2048), generator=torch.Generator().manual_seed(0))
    strategy = {"model.layers.0.self_attn": dict(zip(ATTN_CANDIDATES.projections, ATTN_CANDIDATES.candidates[4])),
                "model.layers.0.mlp": dict(zip(MLP_CANDIDATES.projections, MLP_CANDIDATES.candidates[4]))}
    quantize_model(args.work / "model", ids, strategy, 6, args.work / "quantized", device="cuda")
    setup = time.perf_counter() - started

    if args.warmup:
        refine_model(args.work / "model", args.work / "quantized", args.work / "warmup", ids, args.steps,
                     RefineSpec.lr, args.rows_per_step, weights_per_fit=args.weights_per_fit, device="cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    seconds, metrics = {}, None
    for steps in (args.steps, 2 * args.steps):
        t = time.perf_counter()
        metrics = refine_model(args.work / "model", args.work / "quantized", args.work / f"refined-{steps}", ids,
                               steps, RefineSpec.lr, args.rows_per_step, weights_per_fit=args.weights_per_fit,
                               device="cuda")
        seconds[steps] = time.perf_counter() - t
    result = {
        "shape": args.shape, "rows": args.rows, "rows_per_step": args.rows_per_step,
        "weights_per_fit": args.weights_per_fit,
        "parts": metrics["layers"][0]["parts"], "setup_s": round(setup, 1), "refine_s": seconds,
        "per_step_s": (seconds[2 * args.steps] - seconds[args.steps]) / args.steps,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        "device": torch.cuda.get_device_name(),
    }
    print(json.dumps(result))
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
