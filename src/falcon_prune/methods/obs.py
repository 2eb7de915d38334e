"""The optimal brain surgeon on the quadratic model: WoodFisher, and OBS in steps.

``woodfisher`` keeps the longest prefix of the weights by decreasing OBS saliency
w_i² / [H⁻¹]_ii (the exact increase of Q when w_i alone is removed and the others
compensate) and then minimises Q on what is kept (the multi-weight OBS update).
:func:`obs_steps` reaches a budget in several such removals, each recomputing the
saliencies on the shrinking support: one of falcon's warm starts.
"""

from __future__ import annotations

import math

import torch

from falcon_prune.errors import ConfigError
from falcon_prune.loss.quadratic import QuadraticModel
from falcon_prune.loss.saliency import inverse_hessian_diagonal
from falcon_prune.methods.options import SolverResult
from falcon_prune.methods.registry import Problem
from falcon_prune.selection.weights import Budget, costs_of, select_ilp
from falcon_prune.spaces.base import Choices


def woodfisher(problem: Problem) -> SolverResult:
    """The longest prefix by decreasing OBS saliency that fits, then the exact update."""
    c, qm = problem.choices, problem.qm
    selection = c.prefix(c.saliencies(qm, ("obs",), None)["obs"])
    w, objective = qm.solve_with_value(selection.support)
    return c.result(selection, w, objective=objective)


def _step_budget(budget: Budget, count0: int, cost0: float, u: float, last: bool) -> Budget:
    """The budget a fraction ``u`` of the way from (count0, cost0) to ``budget``."""
    if last:
        return budget
    count = None if budget.count is None else max(
        budget.count, math.floor(count0 + (budget.count - count0) * u))
    cost = None if budget.cost is None else max(budget.cost, cost0 + (budget.cost - cost0) * u)
    return Budget(count, cost, budget.floors, budget.bounds)


def obs_steps(qm: QuadraticModel, choices: Choices, beta: float, steps: int,
              saliency: torch.Tensor | None = None) -> SolverResult:
    """Reach the step's budget from the support of ``qm.w_bar`` in ``steps`` removals,
    each to the next of equally spaced budgets: keep the ILP support of the OBS saliencies
    w_i^2 / [H_T^-1]_ii (weighted by f_i^beta) of the current support T, then minimise Q
    on what is kept. Since w minimises Q on T, the saliency is the exact increase of Q when
    w_i alone leaves T, so later steps account for the weights already removed.
    ``saliency``: the OBS saliency of ``qm`` when already computed (the first step's).
    Single weights only (``choices`` over weights)."""
    groups, budget = getattr(choices, "groups", None), getattr(choices, "budget", None)
    if not isinstance(budget, Budget):
        raise ConfigError("SolverOptions.obs_steps > 1 steps through single weights; use "
                          "obs_steps=1 with structure='channels'")
    mask = qm.w_bar != 0
    w = qm.w_bar
    count0, cost0 = int(mask.sum()), costs_of(mask, groups)
    for j in range(1, steps + 1):
        if j > 1 or saliency is None:
            saliency = (w.double() ** 2 / inverse_hessian_diagonal(qm, mask)) * mask
        step = _step_budget(budget, count0, cost0, j / steps, j == steps)
        r = select_ilp(choices.weighted(saliency, beta), groups, step)
        mask = r.mask & mask  # the ILP's greedy fill may add zero-score weights
        w, objective = qm.solve_with_value(mask)
    return SolverResult(w, mask, r.gap, r.upper_bound, 0, objective, qm.lam)
