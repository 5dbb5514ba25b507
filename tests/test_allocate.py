import itertools

import numpy as np
import pytest

from exlbuild.errors import ExlbuildError
from exlbuild.quant.allocate import allocate, block_loss


def random_instance(rng: np.random.Generator, slots: int, options: int, max_cost: int = 1000):
    costs = [rng.integers(1, max_cost, options).tolist() for _ in range(slots)]
    errors = [rng.uniform(1e-4, 0.5, options) for _ in range(slots)]
    for e in errors:  # exercise ties and the accuracy floor
        if rng.random() < 0.2:
            e[rng.integers(options)] = e[0]
        if rng.random() < 0.05:
            e[rng.integers(options)] = 1.0
    return costs, [e.tolist() for e in errors]


def weighted_losses(errors, objective="squared_error", weights=None):
    weights = weights or [1.0] * len(errors)
    return [w * block_loss(np.array(e), objective) for w, e in zip(weights, errors)]


def brute_force(costs, errors, objective="squared_error", weights=None):
    """Cost and objective of every combination."""
    losses = weighted_losses(errors, objective, weights)
    combos = np.array(list(itertools.product(*(range(len(c)) for c in costs))))
    total_cost = sum(np.array(c)[combos[:, s]] for s, c in enumerate(costs))
    total_loss = sum(l[combos[:, s]] for s, l in enumerate(losses))
    return total_cost, total_loss


def optimum(total_cost, total_loss, budget):
    fits = total_cost <= budget
    return total_loss[fits].min() if fits.any() else np.inf


def check_result(result, costs, errors, budget, objective="squared_error", weights=None):
    """Feasible, self-consistent, and no single upgrade still fits (the fill ran to the end)."""
    losses = weighted_losses(errors, objective, weights)
    assert result.cost == sum(c[j] for c, j in zip(costs, result.choice)) <= budget
    assert result.objective == pytest.approx(sum(l[j] for l, j in zip(losses, result.choice)), abs=1e-12)
    assert result.lower_bound <= result.objective + 1e-9
    left = budget - result.cost
    for c, l, j in zip(costs, losses, result.choice):
        assert all(l[k] >= l[j] or c[k] - c[j] > left for k in range(len(c)))


def instances(count: int, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        costs, errors = random_instance(rng, int(rng.integers(2, 7)), int(rng.integers(2, 6)))
        cheapest, dearest = sum(map(min, costs)), sum(map(max, costs))
        budgets = rng.integers(cheapest, dearest + 200, 4).tolist() + [cheapest, dearest]
        yield costs, errors, budgets


@pytest.mark.parametrize("objective", ["squared_error", "log_accuracy", "error", 2.5])
def test_exact_matches_brute_force(objective):
    for costs, errors, budgets in instances(150, seed=1):
        total_cost, total_loss = brute_force(costs, errors, objective)
        for budget in budgets:
            result = allocate(costs, errors, budget, objective=objective)
            assert result.grid_loss_bits == 0  # spare budget below the grid size: the DP is exact
            check_result(result, costs, errors, budget, objective)
            best = optimum(total_cost, total_loss, budget)
            assert result.objective == pytest.approx(best, abs=1e-12)
            assert result.lower_bound <= best + 1e-12


def test_weighted_matches_brute_force():
    """Per-slot weights (measured sensitivities) scale each slot's loss; zero weights are allowed."""
    rng = np.random.default_rng(5)
    for costs, errors, budgets in instances(150, seed=6):
        weights = rng.choice([0.0, 0.1, 1.0, 30.0], len(costs)).tolist()
        total_cost, total_loss = brute_force(costs, errors, weights=weights)
        for budget in budgets:
            result = allocate(costs, errors, budget, weights=weights)
            check_result(result, costs, errors, budget, weights=weights)
            assert result.objective == pytest.approx(optimum(total_cost, total_loss, budget), abs=1e-12)
    # The same errors, the bits go where they are weighted.
    costs, errors = [[10, 20], [10, 20]], [[0.2, 0.1], [0.2, 0.1]]
    assert allocate(costs, errors, 30, weights=[1.0, 2.0]).choice == (0, 1)


def test_coarse_grid_within_proven_bound():
    for costs, errors, budgets in instances(300, seed=2):
        total_cost, total_loss = brute_force(costs, errors)
        for budget in budgets:
            for grid in (3, 10, 40):
                result = allocate(costs, errors, budget, grid=grid)
                check_result(result, costs, errors, budget)
                # Never better than the optimum, never worse than the optimum at the bound's smaller budget.
                assert result.objective >= optimum(total_cost, total_loss, budget) - 1e-12
                assert result.objective <= optimum(total_cost, total_loss, budget - result.grid_loss_bits) + 1e-12


def test_larger_budget_never_worse():
    rng = np.random.default_rng(3)
    for _ in range(5):
        costs, errors = random_instance(rng, slots=20, options=10, max_cost=1500)
        cheapest, dearest = sum(map(min, costs)), sum(map(max, costs))
        previous = np.inf
        for budget in np.linspace(cheapest, dearest, 40).astype(int).tolist():
            result = allocate(costs, errors, budget)
            assert result.grid_loss_bits == 0
            check_result(result, costs, errors, budget)
            assert result.objective <= previous + 1e-12
            previous = result.objective


def test_infeasible_budget_raises():
    costs, errors = [[100, 200], [50, 80]], [[0.1, 0.05], [0.2, 0.1]]
    assert allocate(costs, errors, 150).choice == (0, 0)
    with pytest.raises(ExlbuildError, match="149"):
        allocate(costs, errors, 149)
    with pytest.raises(ExlbuildError, match=r"1\.4900 bits per weight.*1\.5000"):
        allocate(costs, errors, 149, numel=100)


def test_ties_go_to_lowest_index():
    costs, errors = [[10, 10, 10], [5, 7, 5]], [[0.1, 0.1, 0.1], [0.2, 0.2, 0.2]]
    for budget in (15, 17, 100):
        assert allocate(costs, errors, budget).choice == (0, 0)
    # Equal objective either way: the cheaper option stays; two equal upgrades: the lower slot gets it.
    costs, errors = [[10, 20], [10, 20]], [[0.2, 0.1], [0.2, 0.1]]
    assert allocate(costs, errors, 30).choice == (1, 0)


def test_bad_input():
    with pytest.raises(ValueError):
        allocate([[1, 2]], [[0.1]], 10)
    with pytest.raises(ValueError):
        allocate([[1, 2]], [[0.1, 1.5]], 10)
    with pytest.raises(ValueError):
        allocate([[1, 2]], [[0.1, 0.2]], 10, objective="max")
    for weights in ([1.0, 1.0], [-1.0], [float("nan")]):
        with pytest.raises(ValueError, match="weights"):
            allocate([[1, 2]], [[0.1, 0.2]], 10, weights=weights)


def test_realistic_model_fills_budget():
    """80 layers with the reference candidates' bpw spread: within 0.01 bpw of the target, near-optimal."""
    rng = np.random.default_rng(4)
    attn = np.array([2.26, 2.29, 2.39, 2.80, 3.34, 3.33, 4.12, 4.12, 4.16, 4.21,
                     4.33, 4.27, 4.37, 4.43, 5.44, 5.43, 6.12, 6.46, 8.12])
    mlp = np.array([2.32, 2.40, 2.64, 2.95, 3.45, 3.43, 3.68, 4.18, 4.24, 4.43,
                    4.41, 5.41, 5.39, 6.11, 6.47, 7.03, 8.07])
    costs, errors = [], []
    for _ in range(80):
        for bpw, numel in ((attn, 41_943_040), (mlp, 176_160_768)):
            bpw = bpw * (1 + 0.002 * rng.standard_normal(len(bpw)))
            costs.append((bpw * numel).astype(np.int64).tolist())
            errors.append((0.05 * rng.uniform(0.5, 2) * np.exp(-0.9 * (bpw - 2.2))).tolist())
    numel = 80 * (41_943_040 + 176_160_768)
    for bits in (2.5, 4.0, 5.0):
        budget = int(numel * bits)
        result = allocate(costs, errors, budget, numel=numel)
        check_result(result, costs, errors, budget)
        assert bits - result.cost / numel < 0.01
        assert result.grid_loss_bits / numel < 0.01
        assert result.gap < 1e-3 * result.objective
