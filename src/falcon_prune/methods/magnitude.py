"""Magnitude pruning, the baselines: plain (``mp``) and FLOP-aware (``mp_flops``).

``mp`` keeps the longest prefix of the items by decreasing magnitude that fits the budgets
(global magnitude pruning of single weights; group magnitude of units). ``mp_flops`` keeps
the items of largest total magnitude under both budgets at once (the ILP of single weights
with scores w², the knapsack of units): FLOP-aware magnitude pruning.
"""

from __future__ import annotations

from falcon_prune.methods.options import SolverResult
from falcon_prune.methods.registry import Problem


def magnitude(problem: Problem) -> SolverResult:
    """``mp``: the longest prefix by decreasing magnitude that fits."""
    c = problem.choices
    return c.result(c.prefix(c.magnitude()))


def magnitude_flops(problem: Problem) -> SolverResult:
    """``mp_flops``: the largest total magnitude under both budgets."""
    c = problem.choices
    return c.result(c.select(c.magnitude()))
