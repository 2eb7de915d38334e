"""The two-budget 0/1 knapsack that chooses channel units, against scipy's MILP solver."""

import numpy as np
import pytest
import torch

from falcon_prune.selection.knapsack import KnapsackResult, solve_knapsack

milp_mod = pytest.importorskip("scipy.optimize", reason="the reference optimum needs scipy")


def optimum(v, c, s, F, S):
    """The optimal value of the knapsack (scipy.optimize.milp, HiGHS)."""
    rows, upper = [], []
    if F is not None:
        rows.append(c)
        upper.append(F)
    if S is not None:
        rows.append(s)
        upper.append(S)
    cons = ([milp_mod.LinearConstraint(np.array(rows), -np.inf, np.array(upper))]
            if rows else [])
    r = milp_mod.milp(-np.asarray(v), constraints=cons, integrality=np.ones(len(v)),
                      bounds=milp_mod.Bounds(0, 1))
    assert r.success, r.message
    return -r.fun


def solve(v, c, s, F, S) -> KnapsackResult:
    return solve_knapsack(torch.tensor(v), torch.tensor(c), torch.tensor(s), F, S)


def check_consistent(r, v, c, s, F, S):
    """The result's totals are those of its mask, within the budgets, below the bound."""
    mask = r.mask.numpy()
    assert r.mask.dtype == torch.bool and mask.shape == (len(v),)
    assert r.objective == pytest.approx(v[mask].sum(), rel=1e-12, abs=1e-9)
    assert r.cost == pytest.approx(c[mask].sum(), rel=1e-12, abs=1e-9)
    assert r.size == pytest.approx(s[mask].sum(), rel=1e-12, abs=1e-9)
    if F is not None:
        assert c[mask].sum() <= F * (1 + 1e-12)
    if S is not None:
        assert s[mask].sum() <= S * (1 + 1e-12)
    assert r.upper_bound >= r.objective
    assert r.gap == pytest.approx(r.upper_bound - r.objective)


KINDS = ["both", "cost", "size", "none binding"]


def budgets(kind, c, s, g):
    F = float(g.uniform(0.1, 0.9) * c.sum()) if kind in ("both", "cost") else None
    S = float(g.uniform(0.1, 0.9) * s.sum()) if kind in ("both", "size") else None
    if kind == "none binding":
        F, S = float(c.sum()) + 1.0, float(s.sum())
    return F, S


@pytest.mark.parametrize("kind", KINDS)
def test_small_instances_against_milp(kind):
    g = np.random.default_rng(["both", "cost", "size", "none binding"].index(kind))
    for _ in range(25):
        m = int(g.integers(1, 16))
        v = g.integers(0, 20, m).astype(float)
        c = g.integers(0, 30, m).astype(float)  # zero costs and sizes happen
        s = g.integers(0, 30, m).astype(float)
        F, S = budgets(kind, c, s, g)
        r = solve(v, c, s, F, S)
        check_consistent(r, v, c, s, F, S)
        best = optimum(v, c, s, F, S)
        assert r.objective <= best + 1e-9
        assert r.upper_bound >= best - 1e-6 * max(1.0, best)
        if kind == "none binding":
            assert r.mask.all() and r.objective == v.sum() and r.gap == 0


@pytest.mark.parametrize("kind", ["both", "cost", "size"])
def test_large_instances_have_a_small_gap(kind):
    g = np.random.default_rng(10 + KINDS.index(kind))
    for _ in range(4):
        m = int(g.integers(100, 200))
        v = g.uniform(0, 10, m)
        c = g.uniform(1, 100, m) * g.choice([1.0, 1e3], m)  # MACs differ by layer
        s = g.uniform(1, 50, m)
        F = 0.3 * c.sum() if kind in ("both", "cost") else None
        S = 0.4 * s.sum() if kind in ("both", "size") else None
        r = solve(v, c, s, F, S)
        check_consistent(r, v, c, s, F, S)
        best = optimum(v, c, s, F, S)
        assert r.objective <= best + 1e-9
        assert (best - r.objective) / best < 0.02
        assert r.upper_bound >= best * (1 - 1e-9)
        assert (r.upper_bound - best) / best < 0.02  # the dual bound is tight as well


def test_float32_inputs_and_large_costs():
    g = np.random.default_rng(3)
    v, c, s = g.uniform(0, 1, 50), g.uniform(1e5, 1e7, 50), g.uniform(10, 1e4, 50)
    F, S = 0.25 * c.sum(), 0.5 * s.sum()
    r = solve_knapsack(*(torch.tensor(a, dtype=torch.float32) for a in (v, c, s)), F, S)
    assert r.mask.sum() > 0
    check_consistent(r, v.astype(np.float32).astype(float), c.astype(np.float32).astype(float),
                     s.astype(np.float32).astype(float), F * (1 + 1e-6), S * (1 + 1e-6))
    assert r.objective >= 0.95 * optimum(v, c, s, F, S)


# -- degenerate inputs -----------------------------------------------------------------------
V = np.array([3.0, 2.0, 1.0])


def test_no_items():
    z = np.zeros(0)
    r = solve(z, z, z, 1.0, 1.0)
    assert r.mask.shape == (0,) and r.objective == 0 and r.upper_bound == 0


def test_zero_costs_are_free_under_the_cost_budget():
    c, s = np.zeros(3), np.ones(3)
    r = solve(V, c, s, 0.0, 2.0)  # only the size budget binds
    assert r.mask.tolist() == [True, True, False] and r.objective == 5 and r.size == 2
    r = solve(V, c, s, 0.0, None)
    assert r.mask.all() and r.objective == 6 and r.upper_bound == 6


def test_zero_sizes_are_free_under_the_size_budget():
    c, s = np.ones(3), np.zeros(3)
    r = solve(V, c, s, 2.0, 0.0)
    assert r.mask.tolist() == [True, True, False] and r.objective == 5 and r.cost == 2
    r = solve(V, c, s, None, 0.0)
    assert r.mask.all() and r.objective == 6


def test_zero_budgets_take_nothing_that_costs():
    c, s = np.array([1.0, 0.0, 1.0]), np.ones(3)
    r = solve(V, c, s, 0.0, None)
    assert r.mask.tolist() == [False, True, False] and r.objective == 2
    r = solve(V, np.ones(3), s, None, 0.0)
    assert not r.mask.any() and r.objective == 0 and r.upper_bound == 0


@pytest.mark.parametrize("F,S", [(10.0, 10.0), (None, None), (3.0, None), (None, 3.0),
                                 (3.0, 3.0)])
def test_everything_fits(F, S):
    r = solve(V, np.ones(3), np.ones(3), F, S)
    assert r.mask.all() and r.objective == 6 and r.upper_bound == 6 and r.gap == 0
    assert r.cost == 3 and r.size == 3


def test_zero_values_never_break_a_budget():
    r = solve(np.zeros(3), np.ones(3), np.ones(3), 1.5, None)
    assert r.objective == 0 and r.cost <= 1.5 and r.upper_bound == 0


def test_a_small_item_with_a_better_ratio_against_the_best_one():
    # the optimum takes the large item; the dual bound says how far the answer may be
    v, c = np.array([100.0, 1.1]), np.array([100.0, 1.0])
    r = solve(v, c, np.zeros(2), 100.0, None)
    check_consistent(r, v, c, np.zeros(2), 100.0, None)
    assert optimum(v, c, np.zeros(2), 100.0, None) == 100.0
    assert r.upper_bound >= 100.0


@pytest.mark.parametrize("S", [None, 100.0])
def test_the_answer_is_at_least_half_the_optimum(S):
    v, c = np.array([100.0, 1.1]), np.array([100.0, 1.0])
    r = solve(v, c, c, 100.0, S)
    assert r.objective >= 0.5 * optimum(v, c, c, 100.0, S)
