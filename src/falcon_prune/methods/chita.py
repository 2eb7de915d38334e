"""CHITA: sparsity-only IHT with a top-S projection, fitted to a FLOP budget by bisection.

IHT (:mod:`falcon_prune.methods.iht`) with the S largest |v| kept at every iteration, then
the back-solve; with a FLOP budget the largest S whose result meets it is found by
bisection over S, bracketed by global magnitude pruning.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from falcon_prune.methods.iht import refine
from falcon_prune.methods.options import SolverResult
from falcon_prune.methods.registry import Problem
from falcon_prune.selection.groups import CostGroups
from falcon_prune.selection.weights import Budget, costs_of, select_prefix, select_top


def _prefix(w_bar: torch.Tensor, groups: CostGroups, budget: Budget) -> torch.Tensor:
    """Global magnitude pruning's support: the longest prefix by |w| that fits."""
    order = torch.argsort(w_bar.abs(), descending=True, stable=True)
    return select_prefix(order, groups, budget)


def chita(problem: Problem) -> SolverResult:
    """CHITA: IHT with a top-S projection and back-solve (sparsity-only). With a FLOP budget,
    the largest S whose result meets it is found by bisection over S. Single weights."""
    c, qm, opts, trace = problem.choices, problem.qm, problem.options, problem.trace
    groups, budget = c.groups, c.budget

    def run(S: int) -> SolverResult:
        def project(v: torch.Tensor):
            return select_top(v, S, budget), None

        start = _prefix(qm.w_bar, groups, Budget(S, None, budget.floors, budget.bounds))
        return refine(qm, qm.solve_on_support(start), project, opts, trace, f"chita S={S}")

    return search_sparsity(run, qm.w_bar, groups, budget)


def search_sparsity(
    run: Callable[[int], SolverResult], w_bar: torch.Tensor, groups: CostGroups, budget: Budget
) -> SolverResult:
    """The largest count S (within budget.count, at least the floors) whose ``run(S)``
    meets the cost budget, by bisection; the magnitude-pruning prefix gives the bracket."""
    p = w_bar.numel()
    cap = p if budget.count is None else min(p, budget.count)
    least = sum(budget.floors) if budget.has_floors else 0
    if budget.cost is None:
        return run(cap)
    fits = lambda r: costs_of(r.mask, groups) <= budget.cost * (1 + 1e-12)  # noqa: E731
    result = run(cap)
    if fits(result):
        return result
    lo = int(_prefix(w_bar, groups, budget).sum())
    best = run(lo)
    while not fits(best) and lo > least:
        lo = max(least, lo // 2)
        best = run(lo)
    hi = cap
    while hi - lo > max(1, p // 2000):
        mid = (lo + hi) // 2
        r = run(mid)
        if fits(r):
            lo, best = mid, r
        else:
            hi = mid
    return best
