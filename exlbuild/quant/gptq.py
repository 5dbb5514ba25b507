"""Hessian and GPTQ preparation shared by the EXL2 and EXL3 quantizers.

Steps H1–H4 of docs/exl2-format.md section 4.9: accumulate the Hessian of a linear layer's inputs,
order the input features by activation (act-order), damp the diagonal and factor the inverse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from exlbuild.errors import ExlbuildError

DAMPING_FRACTION = 0.12
DAMPING_FLOOR = 1e-5
MAX_DAMPING_ATTEMPTS = 10


class HessianAccumulator:
    """H1: H = (Σ over calibration rows of XᵀX) / number of rows, in `dtype` (float32, or float64 for passes in
    float64).

    No factor 2 and no division by the token count; with no rows added the Hessian is the identity.
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        self.in_features = in_features
        self.rows = 0
        self._sum = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self._averaged = False

    def add(self, x: Tensor) -> None:
        """Add one calibration row's inputs (tokens, K), or several rows at once (..., tokens, K)."""
        if self._averaged:
            raise RuntimeError("HessianAccumulator.add after hessian(): the sum was turned into the average")
        if x.dim() < 2 or x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs (..., tokens, {self.in_features}), got shape {tuple(x.shape)}")
        flat = x.reshape(-1, self.in_features).to(self._sum.device, self._sum.dtype)
        self._sum.addmm_(flat.T, flat)
        self.rows += math.prod(x.shape[:-2])

    def hessian(self) -> Tensor:
        """The Hessian, made from the running sum in place (no second K × K copy); no rows can be added after."""
        if self.rows == 0:
            return torch.eye(self.in_features, dtype=self._sum.dtype, device=self._sum.device)
        if not self._averaged:
            self._sum.div_(self.rows)
            self._averaged = True
        return self._sum


def invert_permutation(perm: Tensor) -> Tensor:
    """inverse[perm[k]] = k (the argsort of a permutation, without sorting)."""
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), dtype=perm.dtype, device=perm.device)
    return inverse


def act_order(hessian: Tensor) -> Tensor:
    """H2: input features by descending Hessian diagonal (stable, so ties keep feature order)."""
    return torch.argsort(torch.diagonal(hessian), descending=True, stable=True)


def damping(hessian: Tensor) -> Tensor:
    """H3: the amount d added to the diagonal: 0.12 of its mean, at least 1e-5. A 0-dim float64 tensor on the
    Hessian's device, the same number as max(0.12 · mean.item(), 1e-5) in Python floats, without reading the mean
    (a read waits for the GPU)."""
    return (torch.diagonal(hessian).mean().double() * DAMPING_FRACTION).clamp(min=DAMPING_FLOOR)


def _damped_inverse_factor(hessian: Tensor, undamped: Tensor, total: Tensor) -> tuple[Tensor, Tensor]:
    """One attempt of H4: upper U with (H + total·I)⁻¹ = UᵀU, `total` added to `hessian`'s diagonal in place (its
    values before any damping are `undamped`), and whether the attempt worked, as a 0-dim bool on the device (where
    it did not, U is garbage)."""
    # The float64 total added in the Hessian's dtype, as a Python float would be.
    torch.add(undamped, total.to(hessian.dtype), out=hessian.diagonal())
    # With J the reversal of the order and J·H·J = L·Lᵀ (H's rows and columns reversed, factored),
    # H⁻¹ = UᵀU for U = J·L⁻¹·J, upper triangular with a positive diagonal: the factor itself, from one
    # factorization and one triangular solve (not H⁻¹ formed and factored again: half the work, and one
    # rounding path fewer). L⁻¹ is solved in place of an identity; two K × K temporaries at a time besides H
    # (3.3 GB each at K = 28672).
    lower, info = torch.linalg.cholesky_ex(hessian.flip(0, 1))
    inverse = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    torch.linalg.solve_triangular(lower, inverse, upper=False, out=inverse)
    del lower
    upper = inverse.flip(0, 1)
    del inverse
    return upper, (info == 0) & torch.isfinite(upper).all()  # (a solve that overflowed gives inf, not NaN)


def inverse_cholesky_upper(hessian: Tensor, damp: Tensor, layer: str = "layer") -> tuple[Tensor, float]:
    """H4: upper U with (H + k·d·I)⁻¹ = UᵀU, for the first k = 1, 2, … ≤ 10 where every step works; `damp` is
    d as `damping` gives it.

    Returns U and the total damping k·d. Raises ExlbuildError when H has NaN or infinite values or no attempt
    succeeds. Adds the damping to `hessian`'s diagonal in place (a K × K float32 copy is 3.3 GB for K = 28672: the
    caller's is reused). Each attempt runs all its steps and reads their outcome once (a read waits for the GPU),
    the first also whether H is finite.
    """
    finite = torch.isfinite(hessian).all()
    undamped = hessian.diagonal().clone()
    for attempt in range(1, MAX_DAMPING_ATTEMPTS + 1):
        total = attempt * damp  # float64, as Python's attempt · d
        upper, works = _damped_inverse_factor(hessian, undamped, total)
        is_finite, worked, total_damping = torch.stack([finite.double(), works.double(), total]).tolist()
        if not is_finite:
            raise ExlbuildError(f"{layer}: Hessian has NaN or infinite values (overflow in the calibration forward?)")
        if worked:
            return upper, total_damping
    raise ExlbuildError(
        f"{layer}: Hessian is not invertible after {MAX_DAMPING_ATTEMPTS} damping attempts "
        f"(diagonal += k·{float(damp):g}); the calibration inputs of this layer are degenerate"
    )


@dataclass(frozen=True, eq=False)
class PreparedHessian:
    """What every option quantized from one Hessian shares (H2–H4)."""

    perm: Tensor  # (K,) int64: stored row k holds input feature perm[k]
    invperm: Tensor  # (K,) int64: input feature i sits in stored row invperm[i]
    inverse_factor: Tensor  # (K, K) upper U of the damped, permuted Hessian's inverse (float32, or float64)
    damping: float | None  # total amount added to the diagonal (None for a speculative preparation: not read)
    # Of a speculative preparation, whether H was finite and its first damping worked: a 0-dim bool on the device
    # (None where prepare_hessian read it and went on until an attempt worked).
    usable: Tensor | None = None


def prepare_hessian(hessian: Tensor, layer: str = "layer", speculative: bool = False) -> PreparedHessian:
    """Act-order, damping and inverse Cholesky factor of a (K, K) Hessian, on its device, in float32 (float64 for a
    float64 Hessian: GPTQ then runs in float64, quantize_options).

    `speculative`: make only the first damping attempt and read nothing (a read waits for the GPU, which then sits
    idle while the host queues the next work); `usable` says whether it worked. Nearly every Hessian of real
    calibration inputs works at once; a caller that reads `usable` False prepares that Hessian again without
    `speculative`, which retries or raises, and gets what that would have given in the first place.
    """
    hessian = hessian.to(torch.promote_types(hessian.dtype, torch.float32))
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"a Hessian must be square, got shape {tuple(hessian.shape)}")
    perm = act_order(hessian)  # (NaN and infinite values: inverse_cholesky_upper raises)
    # Rows, then columns, letting go of each step: two K × K copies at a time, not three (3.3 GB each at
    # K = 28672). The input is freed here when the caller handed over its only reference (dict.pop).
    permuted = hessian[perm]
    del hessian
    permuted = permuted[:, perm]
    if speculative:
        finite = torch.isfinite(permuted).all()
        upper, works = _damped_inverse_factor(permuted, permuted.diagonal().clone(), damping(permuted))
        return PreparedHessian(perm, invert_permutation(perm), upper, None, finite & works)
    upper, total_damping = inverse_cholesky_upper(permuted, damping(permuted), layer)
    return PreparedHessian(perm, invert_permutation(perm), upper, total_damping)
