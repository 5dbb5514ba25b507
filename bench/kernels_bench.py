"""Triton kernels against the PyTorch references on CUDA: correctness at real sizes, then timings.

    python bench/kernels_bench.py [--out DIR] [--profile]

Layers are SmolLM2-135M's: gate_proj (576 → 1536) with its 13 distinct measurement options, down_proj
(1536 → 576) with its 14, and the head (576 → 49152) with one option. "reference" is the PyTorch path
(EXLBUILD_KERNELS=reference: the old row loop and scale search on the GPU), "triton" the kernels.
Times are medians of triton.testing.do_bench (CUDA events). Prints a table; with --out also writes
kernels-bench.json there. --profile prints where a quantize_options call of each path spends GPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

from exlbuild.kernels.gptq_block import BLOCK_ROWS, BlockStep, gptq_block_step
from exlbuild.kernels.pack import decode_layer, pack_bitstream, scale_from_nibbles, unpack_bitstream
from exlbuild.kernels.scale_search import find_group_scales
from exlbuild.quant.exl2.options import BIT_WIDTHS, MLP_CANDIDATES, QuantOption, head_option
from exlbuild.quant.exl2.quantize import pack_layer, quantize_options
from exlbuild.quant.gptq import prepare_hessian

LAYERS = {  # name: (in_features, out_features, options)
    "gate_proj": (576, 1536, list(MLP_CANDIDATES.reduced().distinct[0])),
    "down_proj": (1536, 576, list(MLP_CANDIDATES.reduced().distinct[2])),
    "lm_head": (576, 49152, [head_option(6)]),
}


@contextmanager
def path(mode: str) -> Iterator[None]:
    """Route every dispatcher to 'triton' or 'reference'."""
    os.environ["EXLBUILD_KERNELS"] = mode
    try:
        yield
    finally:
        del os.environ["EXLBUILD_KERNELS"]


def median_ms(fn: Callable[[], object], mode: str) -> float:
    with path(mode):
        fn()  # compile / warm caches outside the timing
        torch.cuda.synchronize()
        return do_bench(fn, warmup=100, rep=500, return_mode="median")


def host_us(fn: Callable[[], object], calls: int = 200) -> float:
    """Microseconds per call of the Triton path in a tight loop: the host's cost where it exceeds the GPU's."""
    with path("triton"):
        fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / calls * 1e6


def layer(in_features: int, out_features: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    weight = torch.randn(out_features, in_features, device="cuda", generator=g) * 0.02
    weight[:, :4] *= 8
    x = torch.randn(4096, in_features, device="cuda", generator=g)
    x *= torch.rand(in_features, device="cuda", generator=g) * 2
    return weight.half(), x.T @ x / 8


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype == torch.float16:
        a, b = a.view(torch.int16), b.view(torch.int16)
    return a.shape == b.shape and torch.equal(a, b)


def check_layer(name: str) -> dict:
    """quantize_options, both paths, on one layer: how many options come out identical."""
    k, n, options = LAYERS[name]
    weight, hessian = layer(k, n)
    prepared = prepare_hessian(hessian, name)
    with path("triton"):
        ours = quantize_options(weight, prepared, options, name)
    with path("reference"):
        reference = quantize_options(weight, prepared, options, name)
    identical = tied = 0
    for o, r in zip(ours, reference):
        if same(o.nibbles, r.nibbles) and same(o.scale_max, r.scale_max):
            assert same(o.codes, r.codes) and same(o.weight, r.weight), f"{name} {o.option}: results differ"
            assert all(same(pack_layer(o)[key], pack_layer(r)[key]) for key in ("q_weight", "q_scale"))
            identical += 1
        else:  # the scale search picked another scale of equal error (to float32 rounding)
            tied += 1
    return {"options": len(options), "identical": identical, "tied": tied}


def time_layer(name: str) -> dict:
    k, n, options = LAYERS[name]
    weight, hessian = layer(k, n)
    prepared = prepare_hessian(hessian, name)
    run = lambda: quantize_options(weight, prepared, options, name)  # noqa: E731
    return {"reference": median_ms(run, "reference"), "triton": median_ms(run, "triton")}


def block_step_inputs(options: int, k: int, n: int) -> tuple:
    weight, hessian = layer(k, n)
    factor = prepare_hessian(hessian).inverse_factor
    work = weight.float().T.contiguous().repeat(options, 1, 1)
    bits = torch.full((options, k), 4.0, device="cuda")
    row_weights = factor.diagonal()[:BLOCK_ROWS].square().reciprocal()
    nibbles, scale_max = find_group_scales(work[:, :BLOCK_ROWS], bits[:, 0].long(), row_weights)
    scale = scale_from_nibbles(nibbles, scale_max)
    codes = torch.empty(options, k, n, dtype=torch.uint8, device="cuda")
    values = torch.empty(options, k, n, dtype=torch.float16, device="cuda")
    errors = torch.empty(options, BLOCK_ROWS, n, device="cuda")
    return BlockStep(work, factor, scale, 2 ** (bits - 1), 2**bits - 1, codes, values, errors), k // 2


def time_block_step() -> list[dict]:
    rows = []
    for label, (options, k, n) in {"gate_proj 13 options": (13, 576, 1536), "down_proj 14 options": (14, 1536, 576),
                                   "lm_head 1 option": (1, 576, 49152)}.items():
        args = block_step_inputs(options, k, n)
        rows.append({"kernel": "gptq_block_step", "case": label, "host_us": host_us(lambda: gptq_block_step(*args)),
                     **{m: median_ms(lambda: gptq_block_step(*args), m) for m in ("reference", "triton")}})
    return rows


def time_search() -> list[dict]:
    rows, g = [], torch.Generator(device="cuda").manual_seed(1)
    for label, (groups, r, n) in {"5 groups 32×1536": (5, 32, 1536), "7 groups 128×576": (7, 128, 576),
                                  "1 group 32×49152": (1, 32, 49152)}.items():
        group_rows = torch.randn(groups, r, n, device="cuda", generator=g) * 0.02
        bits = torch.tensor(BIT_WIDTHS, device="cuda")[torch.randint(6, (groups,), device="cuda", generator=g)]
        row_weights = torch.rand(r, device="cuda", generator=g) + 0.5
        search = lambda: find_group_scales(group_rows, bits, row_weights)  # noqa: E731
        rows.append({"kernel": "find_group_scales", "case": label, "host_us": host_us(search),
                     **{m: median_ms(search, m) for m in ("reference", "triton")}})
    return rows


def time_pack() -> list[dict]:
    rows, g = [], torch.Generator(device="cuda").manual_seed(2)
    for bits in (3, 4, 6):
        codes = torch.randint(1 << bits, (576, 49152), device="cuda", generator=g, dtype=torch.uint8)
        words = pack_bitstream(codes, bits)
        rows.append({"kernel": "pack_bitstream", "case": f"{bits}-bit 576×49152",
                     **{m: median_ms(lambda: pack_bitstream(codes, bits), m) for m in ("reference", "triton")}})
        rows.append({"kernel": "unpack_bitstream", "case": f"{bits}-bit 576×49152",
                     **{m: median_ms(lambda: unpack_bitstream(words, bits), m) for m in ("reference", "triton")}})
    return rows


def time_decode() -> list[dict]:
    rows, g = [], torch.Generator(device="cuda").manual_seed(3)
    # Options whose widths straddle words (6, 5 and 3 bits).
    for name, option in (("down_proj", QuantOption((8, 6, 5), (0.05, 0.1, 0.85), (32, 128, 128))),
                         ("lm_head", head_option(3))):
        k, n, _ = LAYERS[name]
        groups = option.groups(k)
        q_weight = torch.randint(-(2**31), 2**31, (sum(x.qrows for x in groups), n), device="cuda", generator=g,
                                 dtype=torch.int64).to(torch.int32)
        scale = (torch.rand(len(groups), n, device="cuda", generator=g) * 0.01).half()
        invperm = torch.randperm(k, device="cuda", generator=g)
        with path("triton"):
            ours = decode_layer(q_weight, scale, groups, invperm)
        with path("reference"):
            assert same(ours, decode_layer(q_weight, scale, groups, invperm)), f"decode_layer {name} differs"
        rows.append({"kernel": "decode_layer", "case": f"{name} {k}×{n} {option}",
                     "host_us": host_us(lambda: decode_layer(q_weight, scale, groups, invperm)),
                     **{m: median_ms(lambda: decode_layer(q_weight, scale, groups, invperm), m)
                        for m in ("reference", "triton")}})
    return rows


def print_rows(rows: list[dict]) -> None:
    for row in rows:
        host = f"{row['host_us']:.0f}" if "host_us" in row else ""
        print(f"| {row['kernel']} | {row['case']} | {row['reference']:.3f} | {row['triton']:.3f} | "
              f"{row['reference'] / row['triton']:.1f}× | {host} |")


def profile(name: str) -> None:
    k, n, options = LAYERS[name]
    weight, hessian = layer(k, n)
    prepared = prepare_hessian(hessian, name)
    for mode in ("reference", "triton"):
        with path(mode):
            quantize_options(weight, prepared, options, name)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                quantize_options(weight, prepared, options, name)
                torch.cuda.synchronize()
        print(f"--- {name}, {mode}: GPU time by kernel")
        print(prof.key_averages().table(sort_by="device_time_total", row_limit=8, max_name_column_width=60))


def host_profile(name: str) -> None:
    """Where the host spends a quantize_options call of the Triton path (the GPU is mostly idle)."""
    import cProfile
    import pstats

    k, n, options = LAYERS[name]
    weight, hessian = layer(k, n)
    prepared = prepare_hessian(hessian, name)
    with path("triton"):
        quantize_options(weight, prepared, options, name)
        torch.cuda.synchronize()
        profiler = cProfile.Profile()
        profiler.runcall(lambda: (quantize_options(weight, prepared, options, name), torch.cuda.synchronize()))
    print(f"--- {name}, triton: host time by function")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(14)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    info = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    print(info, flush=True)

    checks = {name: check_layer(name) for name in LAYERS}
    print("correctness, quantize_options triton vs reference:", checks, flush=True)
    # Each layer timed twice: the spread between the two is the noise floor of a comparison.
    layers = {name: [time_layer(name), time_layer(name)] for name in LAYERS}
    kernels = time_block_step() + time_search() + time_pack() + time_decode()

    print("\n| what | case | reference ms | triton ms | speedup | triton host µs/call |\n"
          "| --- | --- | ---: | ---: | ---: | ---: |")
    for name, (t, again) in layers.items():
        k, n, options = LAYERS[name]
        print(f"| quantize_options | {name} {k}×{n}, {len(options)} options | {t['reference']:.2f} "
              f"({again['reference']:.2f}) | {t['triton']:.2f} ({again['triton']:.2f}) | "
              f"{t['reference'] / t['triton']:.1f}× | |")
    print_rows(kernels)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "kernels-bench.json").write_text(
            json.dumps({**info, "checks": checks, "layers": layers, "kernels": kernels}, indent=2))
    if args.profile:
        host_profile("down_proj")
        for name in LAYERS:
            profile(name)


if __name__ == "__main__":
    main()
