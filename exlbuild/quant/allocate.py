"""Bit allocation: choose one measured candidate per block so that the model fits a bit budget.

Each slot (slot 2i = attention of layer i, 2i+1 = its MLP) has candidates j with an integer cost
`total_bits[j]` and a measured error e[j] = 1 − accuracy, and optionally a weight (the block's measured
sensitivity: KL at the model's output per unit of e²). We choose one candidate per slot with
Σ cost ≤ budget, minimising Σ weight · loss(e). This replaces the reference converter's simulated annealing
(docs/exl2-format.md 4.7) with a deterministic, provably near-optimal solver:

1. Drop dominated candidates (another is no more expensive and no worse).
2. Dynamic programming over the budget left after every slot's cheapest candidate, discretised into
   at most `grid` cells. Costs are rounded *up* to the cell size q, so whatever the DP picks fits the real
   budget; and every choice that costs at most budget − (n+1)(q−1) still fits the rounded budget, so the DP
   result is at least as good as the true optimum at that slightly smaller budget (n = number of slots;
   q = 1, i.e. exact, whenever the spare budget has at most `grid` bits).
3. Greedy fill on the real costs: while some upgrade fits into what is left, take the one with the largest
   loss reduction per bit. This spends the budget the rounding left unused.
4. The LP relaxation (= Lagrangian dual) gives a lower bound on any feasible choice, so every result carries
   an a-posteriori optimality gap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from exlbuild.errors import ExlbuildError

MIN_ACCURACY = 1e-6  # the reference measurement clamps accuracy to this floor (4.5)


@dataclass(frozen=True)
class Allocation:
    """The chosen candidate of every slot, with what it costs and how good it provably is."""

    choice: tuple[int, ...]  # candidate index per slot
    cost: int  # Σ total_bits of the chosen candidates, never above the budget
    objective: float  # Σ loss(e) of the chosen candidates
    lower_bound: float  # no choice within the budget has a smaller objective (LP relaxation)
    grid_loss_bits: int  # objective ≤ the exact optimum at budget − grid_loss_bits (0: exact before the fill)

    @property
    def gap(self) -> float:
        """Upper bound on how far `objective` is from the true optimum."""
        return self.objective - self.lower_bound


def block_loss(errors: np.ndarray, objective: str | float = "squared_error") -> np.ndarray:
    """The per-block loss whose sum over slots is minimised.

    "squared_error" (default): e². A small perturbation δ of a block's output raises the model's loss (its
    KL divergence from the unquantized model) by a quadratic form in δ, not a linear one: at the unquantized
    output the first-order term vanishes. With e = ‖δ‖ / ‖y‖, Σ e² is that second-order estimate with equal
    weight per block, and it penalises one badly damaged block more than several slightly worse ones. On
    SmolLM2-135M at 4.0 bpw it beat Σ −log(1 − e) on all three held-out texts measured (bench/NOTES.md §6).
    "log_accuracy": −log(1 − e), so the sum is −log Π accuracy (≈ Σ e: first order).
    "error": e, the plain first-order proxy. A float p: e**p, the reference's `norm`.
    """
    if objective == "squared_error":
        return errors**2
    if objective == "log_accuracy":
        return -np.log(np.maximum(1.0 - errors, MIN_ACCURACY))
    if objective == "error":
        return errors.copy()
    if isinstance(objective, (int, float)) and not isinstance(objective, bool) and objective > 0:
        return errors ** float(objective)
    raise ValueError("objective must be 'squared_error', 'log_accuracy', 'error' or a positive exponent, "
                     f"not {objective!r}")


def allocate(
    costs: Sequence[Sequence[int]],
    errors: Sequence[Sequence[float]],
    budget: int,
    *,
    objective: str | float = "squared_error",
    weights: Sequence[float] | None = None,
    numel: int | None = None,
    grid: int = 1 << 16,
) -> Allocation:
    """Pick one candidate per slot with Σ cost ≤ budget, minimising Σ weights[s] · block_loss(error).

    costs[s][j], errors[s][j]: total_bits and 1 − accuracy of candidate j of slot s. weights[s] ≥ 0 (default
    1 each) says what a unit of slot s's loss costs; with "squared_error" and measured sensitivities the
    objective is the predicted KL divergence of the whole model. numel (optional) is only
    used to state bits per weight in the error raised when even the cheapest choice exceeds the budget.
    grid bounds the DP's cells: more cells, a smaller grid_loss_bits, proportionally more time.
    Deterministic: among equally good candidates the lowest index wins.
    """
    if len(costs) != len(errors) or any(len(c) != len(e) or not c for c, e in zip(costs, errors)):
        raise ValueError("costs and errors must have one non-empty list per slot, of equal lengths")
    n = len(costs)
    weights = [1.0] * n if weights is None else [float(w) for w in weights]
    if len(weights) != n or not all(math.isfinite(w) and w >= 0 for w in weights):
        raise ValueError("weights must be one finite non-negative number per slot")
    cost_rows = [np.asarray(c, dtype=np.int64) for c in costs]
    loss_rows = []
    for e, weight in zip(errors, weights):
        e = np.asarray(e, dtype=np.float64)
        if not np.all((e >= 0) & (e <= 1)):
            raise ValueError("errors must lie in [0, 1]")
        loss_rows.append(weight * block_loss(e, objective))

    cheapest = sum(int(c.min()) for c in cost_rows)
    if cheapest > budget:
        msg = f"the bit budget {budget:,} is below the cheapest possible choice of candidates, {cheapest:,} bits"
        if numel:
            msg += (f": the target is {budget / numel:.4f} bits per weight, "
                    f"the smallest achievable is {cheapest / numel:.4f}")
        raise ExlbuildError(msg)

    # Work on the undominated candidates only, in ascending cost (and so strictly descending loss).
    kept = [_undominated(c, l) for c, l in zip(cost_rows, loss_rows)]
    cost_rows = [c[k] for c, k in zip(cost_rows, kept)]
    loss_rows = [l[k] for l, k in zip(loss_rows, kept)]

    spare = budget - cheapest
    q = max(1, -(-spare // grid))
    pick = _dp(cost_rows, loss_rows, spare, q)
    pick = _fill(cost_rows, loss_rows, pick, budget)

    choice = tuple(int(k[p]) for k, p in zip(kept, pick))
    cost = sum(int(c[p]) for c, p in zip(cost_rows, pick))
    assert cost <= budget
    return Allocation(
        choice=choice,
        cost=cost,
        objective=float(sum(l[p] for l, p in zip(loss_rows, pick))),
        lower_bound=_lp_bound(cost_rows, loss_rows, budget),
        grid_loss_bits=min(spare, (n + 1) * (q - 1)),
    )


def _undominated(cost: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Indices of the candidates no other beats, ascending in cost; ties go to the lowest index."""
    order = np.lexsort((np.arange(len(cost)), loss, cost))  # by cost, then loss, then index
    kept, best = [], math.inf
    for j in order:
        if loss[j] < best:
            kept.append(j)
            best = loss[j]
    return np.array(kept, dtype=np.int64)


def _dp(cost_rows: list[np.ndarray], loss_rows: list[np.ndarray], spare: int, q: int) -> list[int]:
    """Optimal choice (positions in each row) when each cost above the row's minimum is rounded up to q bits.

    f[u] = least loss of the slots so far using at most u cells; rounding up keeps every pick feasible.
    """
    cells = spare // q
    widths = [-(-(cost - cost[0]) // q) for cost in cost_rows]  # cells each candidate takes, ascending
    f = np.zeros(cells + 1)
    step = np.zeros((len(cost_rows), cells + 1), dtype=np.min_scalar_type(max(len(c) for c in cost_rows)))
    for s, (width, loss) in enumerate(zip(widths, loss_rows)):
        g = f + loss[0]  # the cheapest candidate takes no cells
        for j in range(1, int(np.searchsorted(width, cells, side="right"))):
            w = int(width[j])
            v = f[: cells + 1 - w] + loss[j]
            better = v < g[w:]  # strict: the cheaper candidate wins ties
            np.copyto(g[w:], v, where=better)
            np.copyto(step[s, w:], j, where=better)
        f = g
    pick, u = [0] * len(cost_rows), cells
    for s in range(len(cost_rows) - 1, -1, -1):
        pick[s] = int(step[s, u])
        u -= int(widths[s][pick[s]])
    return pick


def _fill(cost_rows: list[np.ndarray], loss_rows: list[np.ndarray], pick: list[int], budget: int) -> list[int]:
    """Greedy upgrades on real costs, best loss reduction per bit first, while any upgrade fits."""
    width = max(len(c) for c in cost_rows)
    cost = np.full((len(cost_rows), width), np.iinfo(np.int64).max // 2, dtype=np.int64)  # padding never fits
    loss = np.full((len(cost_rows), width), np.inf)
    for s, (c, l) in enumerate(zip(cost_rows, loss_rows)):
        cost[s, : len(c)] = c
        loss[s, : len(l)] = l
    pick = np.array(pick)
    rows = np.arange(len(pick))
    left = budget - int(cost[rows, pick].sum())
    while True:
        gain = loss[rows, pick][:, None] - loss
        extra = cost - cost[rows, pick][:, None]  # > 0 wherever gain > 0: rows are undominated
        ok = (gain > 0) & (extra <= left)
        if not ok.any():
            return pick.tolist()
        rate = np.where(ok, gain / np.maximum(extra, 1), -np.inf)
        s, j = divmod(int(np.argmax(rate)), width)  # first maximum: lowest slot, then lowest candidate
        left -= int(extra[s, j])
        pick[s] = j


def _lp_bound(cost_rows: list[np.ndarray], loss_rows: list[np.ndarray], budget: int) -> float:
    """Optimum of the LP relaxation: start from the cheapest candidates and buy lower-convex-hull segments of
    all slots in order of loss reduction per bit, the last one fractionally. Every feasible choice is a point
    of this relaxation, so no choice beats it."""
    bound = sum(float(l[0]) for l in loss_rows)
    left = budget - sum(int(c[0]) for c in cost_rows)
    segments = []  # (loss change per bit, bits, loss change)
    for cost, loss in zip(cost_rows, loss_rows):
        hull = [0]
        for j in range(1, len(cost)):
            # Pop the last hull point while it lies on or above the chord to j.
            while len(hull) >= 2:
                a, b = hull[-2], hull[-1]
                if (loss[b] - loss[a]) * (cost[j] - cost[a]) >= (loss[j] - loss[a]) * (cost[b] - cost[a]):
                    hull.pop()
                else:
                    break
            hull.append(j)
        for a, b in zip(hull, hull[1:]):
            dc, dl = int(cost[b] - cost[a]), float(loss[b] - loss[a])
            segments.append((dl / dc, dc, dl))
    segments.sort(key=lambda seg: seg[0])
    for _, dc, dl in segments:
        if dc <= left:
            bound += dl
            left -= dc
        else:
            bound += dl * left / dc
            break
    return bound
