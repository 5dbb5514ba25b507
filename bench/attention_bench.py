"""The fits' attention on the GPU: exlbuild's Triton kernels (kernels/attention.py) against PyTorch's flash attention,
deterministic and not, at a refinement step's and a tuning step's shapes (4 and 2 rows of SmolLM2: 9 query heads and
3 KV heads of 64, 2048 positions, causal, bfloat16), in the model's layout. Forward and backward time, whether the
gradients repeat bit for bit, and how far each lands from flash attention's non-deterministic result (relative to
the largest value). With --blocks, each kernel's block sizes, warps and stages are tried too at the refinement's shape
(kernels.attention's LaunchConfig, one kernel at a time). --shape takes another layer shape of bench/scale.py (its
heads, KV heads and head width): llama3-8b and llama3-70b have heads of 128.

    python bench/attention_bench.py [--shape smollm2] [--blocks] > bench/results/attention-bench-h100.txt
"""

from __future__ import annotations

import argparse
import itertools

import torch
from scale import SHAPES
from sdpa_probe import flash_attention, timed

import exlbuild.kernels.attention as kernel

POSITIONS = 2048
REPEAT = 50


def inputs(rows: int, shape: dict) -> list[torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(0)
    heads, kv_heads = shape["num_attention_heads"], shape["num_key_value_heads"]
    head_dim = shape["hidden_size"] // heads

    def randn(heads: int) -> torch.Tensor:  # (rows, seq, heads, dim) transposed, as llama.attention has them
        return torch.randn(rows, POSITIONS, heads, head_dim, device="cuda", generator=g).bfloat16().transpose(1, 2)

    return [randn(heads), randn(kv_heads), randn(kv_heads), randn(heads)]


def triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return kernel.causal_attention_triton(q, k, v, q.shape[-1] ** -0.5)


def measure(attention, rows: int, shape: dict, deterministic: bool,
            truth: list[torch.Tensor] | None) -> tuple[str, list]:
    torch._C._set_deterministic_algorithms(deterministic)
    q, k, v, grad_out = inputs(rows, shape)
    leaves = [x.requires_grad_() for x in (q, k, v)]

    def step() -> list[torch.Tensor]:
        out = attention(*leaves)
        return [out.detach(), *torch.autograd.grad(out, leaves, grad_out)]

    first = step()
    repeatable = all(all(torch.equal(a, b) for a, b in zip(step(), first)) for _ in range(5))
    both = timed(step, REPEAT) * 1e3
    with torch.no_grad():
        alone = timed(lambda: attention(*leaves), REPEAT) * 1e3
    line = f"forward+backward {both:.3f} ms, forward {alone:.3f} ms, repeatable {repeatable}"
    if truth is not None:
        errors = [((a.float() - b.float()).abs().max() / b.float().abs().max()).item() for a, b in zip(first, truth)]
        line += ", from flash (O, dQ, dK, dV) " + " ".join(f"{e:.1e}" for e in errors)
    return line, first


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="smollm2", choices=list(SHAPES), help="a layer shape of bench/scale.py")
    ap.add_argument("--blocks", action="store_true", help="also try other block sizes, warps and stages")
    args = ap.parse_args()
    shape = SHAPES[args.shape]
    print(torch.__version__, torch.cuda.get_device_name(), args.shape)
    truths = {}
    for rows in (4, 2):
        line, truths[rows] = measure(flash_attention, rows, shape, False, None)
        print(f"rows={rows} flash, not deterministic: {line}", flush=True)
        for name, attention in (("flash, deterministic:    ", flash_attention), ("triton:                  ", triton)):
            print(f"rows={rows} {name} {measure(attention, rows, shape, True, truths[rows])[0]}", flush=True)
    if args.blocks:
        # One kernel's configuration at a time, the others at their defaults, at the refinement's shape.
        for name in ("FORWARD", "KEY_BLOCKS", "QUERY_BLOCKS"):
            default = getattr(kernel, name)
            for config in itertools.product((64, 128), (64, 128), (4, 8), (2, 3)):
                setattr(kernel, name, kernel.LaunchConfig(*config))
                try:
                    line = measure(triton, 4, shape, True, truths[4])[0]
                except Exception as e:  # a configuration that does not fit (shared memory, registers)
                    line = f"fails: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
                print(f"rows=4 triton {name} {config}: {line}", flush=True)
            setattr(kernel, name, default)


if __name__ == "__main__":
    main()
