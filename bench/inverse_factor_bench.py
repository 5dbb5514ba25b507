"""GPTQ's inverse factor two ways, timed on the GPU and checked against float64: U with H⁻¹ = UᵀU from one
Cholesky factorization of the Hessian with its order reversed (quant/gptq.py since session 23), against H⁻¹ formed
by a GEMM from the Cholesky factor's inverse and factored again (the code before).

    python bench/inverse_factor_bench.py [--sizes 576 1536 4096 14336] > bench/results/inverse-factor-h100.txt

The Hessians are those of random activations (8192 rows), damped by 0.1 on the diagonal.
"""

from __future__ import annotations

import argparse
import time

import torch

from exlbuild.quant.gptq import inverse_cholesky_upper


def factor_refactored(h: torch.Tensor) -> torch.Tensor:
    """The code before: L⁻¹ from H = L·Lᵀ, then H⁻¹ = L⁻ᵀL⁻¹ by a GEMM, factored again (upper)."""
    lower, _ = torch.linalg.cholesky_ex(h)
    inverse = torch.eye(h.shape[0], device=h.device)
    torch.linalg.solve_triangular(lower, inverse, upper=False, out=inverse)
    return torch.linalg.cholesky_ex(inverse.T @ inverse, upper=True)[0]


def factor_reversed(h: torch.Tensor) -> torch.Tensor:
    """Session 23's, the project's own (J·H·J = L·Lᵀ, U = J·L⁻¹·J), on a copy of the damped H with no further damping
    (the copy and the function's one read of its outcome are timed too)."""
    return inverse_cholesky_upper(h.clone(), torch.zeros((), dtype=torch.float64, device=h.device))[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[576, 1536, 4096, 14336])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}: ms a factor (mean of {args.repeats}), "
          "relative Frobenius error against float64's Cholesky factor of the inverse")
    for k in args.sizes:
        x = torch.randn(8192, k, device="cuda")
        h = x.T @ x / 8192 + 0.1 * torch.eye(k, device="cuda")
        truth = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h.double())), upper=True)
        for name, factor in (("refactored", factor_refactored), ("reversed", factor_reversed)):
            u = factor(h)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(args.repeats):
                factor(h)
            torch.cuda.synchronize()
            ms = (time.perf_counter() - t) / args.repeats * 1000
            error = ((u.double() - truth).norm() / truth.norm()).item()
            print(f"K = {k:5d}  {name:10s}  {ms:8.2f} ms  error {error:.2e}", flush=True)


if __name__ == "__main__":
    main()
