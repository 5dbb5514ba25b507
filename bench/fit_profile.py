"""Where the refinement's and the tuning's time goes on the GPU: both run under torch.profiler on a random model in
a real layer shape (bench/scale.py), quantized with one fixed option per block (~4 bits), and the kernels are
listed by their GPU time beside the wall time.

    python bench/fit_profile.py [--shape smollm2] [--layers 4] [--steps 200] --out /tmp/fit-profile.txt

Each fit runs once untimed first, so that compiling, the allocator and the first launches fall outside the profile.
After the kernels, each fit's fixed part (a run of 0 steps) is listed by exlbuild function in host time (cProfile).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from scale import SHAPES, write_model
from tune_depth import fixed_strategy

from exlbuild.quant.exl2.convert import quantize_model
from exlbuild.quant.exl2.refine import refine_model
from exlbuild.quant.exl2.tune import tune_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="smollm2", choices=list(SHAPES))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rows", type=int, default=100)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=200, help="refinement steps a layer (the tuning: the recipe's 100)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--work", type=Path, default=Path("/tmp/exlbuild-fit-profile"))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    vocab = SHAPES[args.shape]["vocab_size"]
    write_model(args.work / "model", args.shape, args.layers, args.device)
    ids = torch.randint(0, vocab, (args.rows, args.length), generator=torch.Generator().manual_seed(0))
    quantize_model(args.work / "model", ids, fixed_strategy(args.layers), 6, args.work / "quantized", device=args.device)
    fits = {
        "refine": lambda out, steps: refine_model(args.work / "model", args.work / "quantized", out, ids, steps,
                                                  0.01, 4, device=args.device),
        "tune": lambda out, steps: tune_model(args.work / "model", args.work / "quantized", out, ids, steps=steps,
                                              lr=1e-3, rows_per_step=2, device=args.device),
    }
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    report = [f"{args.shape}, {args.layers} layers, {args.rows} x {args.length} rows, {device_name}"]
    for name, fit in fits.items():
        steps = args.steps if name == "refine" else 100
        fit(args.work / f"{name}-warmup", steps)
        seconds = {}
        for n in (0, steps):
            sync()
            t = time.perf_counter()
            fit(args.work / f"{name}-{n}", n)
            sync()
            seconds[n] = time.perf_counter() - t
        with profile(activities=activities) as prof:
            t = time.perf_counter()
            fit(args.work / f"{name}-profiled", steps)
            sync()
            wall = time.perf_counter() - t
        events = prof.key_averages()
        # Kernels and copies only: an operator's row repeats the device time of the kernels it launched.
        gpu = sum(e.self_device_time_total for e in events if e.device_type != DeviceType.CPU) / 1e6
        per_step = (seconds[steps] - seconds[0]) / (steps * (args.layers if name == "refine" else 1))
        report += ["", f"## {name}: {steps} steps; 0 steps {seconds[0]:.2f} s, {steps} steps {seconds[steps]:.2f} s "
                   f"({per_step * 1e3:.3f} ms a step); profiled run {wall:.2f} s wall, {gpu:.2f} s of GPU time",
                   events.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=40,
                                max_name_column_width=110)]
        # The fixed part (0 steps) by exlbuild function, in host time: where it waits for the GPU, the call that
        # synchronises carries the wait.
        host = cProfile.Profile()
        host.enable()
        fit(args.work / f"{name}-fixed", 0)
        sync()
        host.disable()
        text = io.StringIO()
        pstats.Stats(host, stream=text).sort_stats("cumulative").print_stats("exlbuild", 30)
        report += [f"### {name}, 0 steps: host time by exlbuild function (cProfile, cumulative)", text.getvalue()]
        print("\n".join(report[-4:]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(report) + "\n")


if __name__ == "__main__":
    main()
