"""Where the quantization pass's, the refinement's and the tuning's time goes on the GPU: each runs under
torch.profiler on a random model in a real layer shape (bench/scale.py), quantized with one fixed option per block
(~4 bits), and the kernels are listed by their GPU time beside the wall time.

    python bench/fit_profile.py [--shape smollm2] [--layers 4] [--steps 200] --out /tmp/fit-profile.txt

Each fit runs once untimed first, so that compiling, the allocator and the first launches fall outside the profile.
bench/fit_step_variants.py times the same fits (`random_fits`, `timed_fit`).
After the kernels, the quantization pass and each fit's fixed part (a run of 0 steps) are listed by exlbuild
function in host time (cProfile), then each fit's first run in the process; each fit's title line also says what its
CUDA graph captures cost (a further run with capture_begin and capture_end timed).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import math
import pstats
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from scale import SHAPES, write_model
from tune_depth import fixed_strategy

import exlbuild.quant.exl2.refine as refine
import exlbuild.quant.exl2.tune as tune
from exlbuild.quant.exl2.convert import quantize_model

Fit = Callable[[Path, int], Any]  # fit(out_dir, steps)


def random_fits(work: Path, shape: str, layers: int, rows: int, length: int, device: str,
                refine_rows_per_step: int = 4, reuse: bool = False) -> dict[str, Fit]:
    """A random model of `layers` layers in `shape` under `work`, quantized with one fixed option per block, and its
    two fits (the refinement: rate 0.01, `refine_rows_per_step` rows a step; the tuning: 1e-3, 2 rows); under
    "quantize", that quantization pass itself (steps ignored). The fits are looked up in their modules at each call,
    so that a bench may replace a module's functions in between. `reuse`: keep the model and quantization pass a
    run before left in `work` (so that runs of two versions of the code fit the same starting point)."""
    ids = torch.randint(0, SHAPES[shape]["vocab_size"], (rows, length), generator=torch.Generator().manual_seed(0))

    def quantize(out: Path, steps: int) -> Any:
        return quantize_model(work / "model", ids, fixed_strategy(layers), 6, out, device=device)

    if not (reuse and (work / "quantized").exists()):
        write_model(work / "model", shape, layers, device)
        quantize(work / "quantized", 0)
    return {
        "quantize": quantize,
        "refine": lambda out, steps: refine.refine_model(work / "model", work / "quantized", out, ids, steps, 0.01,
                                                         refine_rows_per_step, device=device),
        "tune": lambda out, steps: tune.tune_model(work / "model", work / "quantized", out, ids, steps=steps, lr=1e-3,
                                                   rows_per_step=2, device=device),
    }


def timed_fit(name: str, fit: Fit, steps: int, layers: int, work: Path, sync: Callable[[], None],
              first: cProfile.Profile | None = None, repeats: int = 1) -> dict[str, float]:
    """A first run of `steps` (compiling, the allocator and the first launches; under the profiler `first` if given),
    then `repeats` runs each of 0 and `steps`: the best seconds of each, and the milliseconds a step (a refinement step
    is one layer's, so it divides by the layers too). Writes to work/NAME-warmup, NAME-0 and NAME-STEPS."""
    sync()
    t = time.perf_counter()
    if first is not None:
        first.enable()
    fit(work / f"{name}-warmup", steps)
    sync()
    if first is not None:
        first.disable()
    first_s = time.perf_counter() - t
    seconds = {0: math.inf, steps: math.inf}
    for n in (0, steps) * repeats:
        sync()
        t = time.perf_counter()
        fit(work / f"{name}-{n}", n)
        sync()
        seconds[n] = min(seconds[n], time.perf_counter() - t)
    step_ms = (seconds[steps] - seconds[0]) / (steps * (layers if name == "refine" else 1)) * 1e3
    return {"step_ms": step_ms, "fixed_s": seconds[0], "total_s": seconds[steps], "first_s": first_s}


@contextlib.contextmanager
def capture_times() -> Iterator[dict[str, float]]:
    """Seconds spent in CUDA graph captures while the block runs: waiting for the device before capture_begin (a
    synchronize put in front of it here), capture_begin itself, and capture_end (the graph's instantiation), with
    the number of captures."""
    times = {"captures": 0, "wait_s": 0.0, "begin_s": 0.0, "end_s": 0.0}
    graph = torch.cuda.CUDAGraph
    begin, end = graph.capture_begin, graph.capture_end

    def timed_begin(self, *args, **kwargs):
        t0 = time.perf_counter()
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        begin(self, *args, **kwargs)
        times["captures"] += 1
        times["wait_s"] += t1 - t0
        times["begin_s"] += time.perf_counter() - t1

    def timed_end(self, *args, **kwargs):
        t = time.perf_counter()
        end(self, *args, **kwargs)
        times["end_s"] += time.perf_counter() - t

    graph.capture_begin, graph.capture_end = timed_begin, timed_end
    try:
        yield times
    finally:
        graph.capture_begin, graph.capture_end = begin, end


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
    fits = random_fits(args.work, args.shape, args.layers, args.rows, args.length, args.device)
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    report = [f"{args.shape}, {args.layers} layers, {args.rows} x {args.length} rows, {device_name}"]
    for name, fit in fits.items():
        steps = {"quantize": 0, "refine": args.steps, "tune": 100}[name]
        first = cProfile.Profile()
        if steps:
            timing = timed_fit(name, fit, steps, args.layers, args.work, sync, first)
            title = (f"## {name}: {steps} steps; 0 steps {timing['fixed_s']:.2f} s, {steps} steps "
                     f"{timing['total_s']:.2f} s ({timing['step_ms']:.3f} ms a step), the process's first run "
                     f"{timing['first_s']:.2f} s")
            if cuda:
                with capture_times() as captured:
                    fit(args.work / f"{name}-captures", steps)
                title += (f"; {captured['captures']} graph captures: {captured['wait_s']:.3f} s waiting for the "
                          f"device before them, {captured['begin_s']:.3f} s in capture_begin, "
                          f"{captured['end_s']:.3f} s in capture_end")
        else:  # the quantization pass ran once in random_fits: compiling and first launches are behind it
            title = f"## {name}"
        with profile(activities=activities) as prof:
            t = time.perf_counter()
            fit(args.work / f"{name}-profiled", steps)
            sync()
            wall = time.perf_counter() - t
        events = prof.key_averages()
        # Kernels and copies only: an operator's row repeats the device time of the kernels it launched.
        gpu = sum(e.self_device_time_total for e in events if e.device_type != DeviceType.CPU) / 1e6
        report += ["", f"{title}; profiled run {wall:.2f} s wall, {gpu:.2f} s of GPU time",
                   events.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=40,
                                max_name_column_width=110)]
        # The fixed part (0 steps) by exlbuild function, in host time: where it waits for the GPU, the call that
        # synchronises carries the wait. (Sorted by own time too: the cumulative list names the callers.)
        host = cProfile.Profile()
        host.enable()
        fit(args.work / f"{name}-fixed", 0)
        sync()
        host.disable()
        text = io.StringIO()
        pstats.Stats(host, stream=text).sort_stats("cumulative").print_stats("exlbuild", 30)
        pstats.Stats(host, stream=text).sort_stats("tottime").print_stats(25)
        report += [f"### {name}{', 0 steps' if steps else ''}: host time by exlbuild function (cProfile, cumulative), "
                   "then by own time",
                   text.getvalue()]
        if steps:  # what the process's first run pays more than the later ones: compiling, loading, imports
            text = io.StringIO()
            pstats.Stats(first, stream=text).sort_stats("cumulative").print_stats(40)
            report += [f"### {name}, the process's first run: host time by function (cProfile, cumulative)",
                       text.getvalue()]
        print("\n".join(report[-4:]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(report) + "\n")


if __name__ == "__main__":
    main()
