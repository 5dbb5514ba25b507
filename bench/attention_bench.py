"""The fits' attention on the GPU: exlbuild's Triton kernels (kernels/attention.py) against PyTorch's flash attention,
deterministic and not, at a refinement step's and a tuning step's shapes (4 and 2 rows of SmolLM2: 9 query heads and
3 KV heads of 64, 2048 positions, causal, bfloat16), in the model's layout. Forward and backward time, whether the
gradients repeat bit for bit, and how far each lands from flash attention's non-deterministic result (relative to
the largest value). With --blocks, each kernel's block sizes, warps and stages are tried too at the refinement's shape
(kernels.attention's LaunchConfig, one kernel at a time).

    python bench/attention_bench.py [--blocks] > bench/results/attention-bench-h100.txt
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F
from sdpa_probe import timed
from torch.nn.attention import SDPBackend, sdpa_kernel

import exlbuild.kernels.attention as kernel

HEADS, KV_HEADS, POSITIONS, HEAD_DIM = 9, 3, 2048, 64
REPEAT = 50


def inputs(rows: int) -> list[torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(0)

    def randn(heads: int) -> torch.Tensor:  # (rows, seq, heads, dim) transposed, as llama.attention has them
        return torch.randn(rows, POSITIONS, heads, HEAD_DIM, device="cuda", generator=g).bfloat16().transpose(1, 2)

    return [randn(HEADS), randn(KV_HEADS), randn(KV_HEADS), randn(HEADS)]


def flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return kernel.causal_attention_triton(q, k, v, HEAD_DIM**-0.5)


def measure(attention, rows: int, deterministic: bool, truth: list[torch.Tensor] | None) -> tuple[str, list]:
    torch._C._set_deterministic_algorithms(deterministic)
    q, k, v, grad_out = inputs(rows)
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
    ap.add_argument("--blocks", action="store_true", help="also try other block sizes, warps and stages")
    args = ap.parse_args()
    print(torch.__version__, torch.cuda.get_device_name())
    truths = {}
    for rows in (4, 2):
        line, truths[rows] = measure(flash, rows, False, None)
        print(f"rows={rows} flash, not deterministic: {line}", flush=True)
        print(f"rows={rows} flash, deterministic:     {measure(flash, rows, True, truths[rows])[0]}", flush=True)
        print(f"rows={rows} triton:                   {measure(triton, rows, True, truths[rows])[0]}", flush=True)
    if args.blocks:
        # One kernel's configuration at a time, the others at their defaults, at the refinement's shape.
        for name in ("FORWARD", "KEY_BLOCKS", "QUERY_BLOCKS"):
            default = getattr(kernel, name)
            for shape in itertools.product((64, 128), (64, 128), (4, 8), (2, 3)):
                setattr(kernel, name, kernel.LaunchConfig(*shape))
                try:
                    line = measure(triton, 4, True, truths[4])[0]
                except Exception as e:  # a configuration that does not fit (shared memory, registers)
                    line = f"fails: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
                print(f"rows=4 triton {name} {shape}: {line}", flush=True)
            setattr(kernel, name, default)


if __name__ == "__main__":
    main()
