"""Choosing a support under the budgets, with per-layer floors.

Every method ends by choosing which weights to keep: by the ILP on scores
(:func:`select_ilp`) or by the longest prefix of an importance order
(:func:`select_prefix`). A :class:`Budget` holds the two absolute budgets and, optionally,
per-layer *floors*: the least number of weights each layer keeps (so that no layer, and so
no network output, is emptied; see ``min_density`` and ``allow_empty_layers`` in
:class:`~falcon_prune.config.PruneConfig`).

Floors are met exactly and cheaply: within a layer every weight has the same cost, so the
best support that keeps at least k weights of a layer keeps its k best-scored ones. Those
are taken first; the rest is chosen with the remaining budgets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from falcon_prune.errors import BudgetError
from falcon_prune.selection.groups import CostGroups
from falcon_prune.selection.ilp import ILPResult, solve_ilp

REL_TOL = 1e-12


@dataclass(frozen=True)
class Budget:
    """Absolute budgets: ``count`` kept weights and ``cost`` kept MACs per sample (None:
    no limit); ``floors`` (L,) the least kept count of each layer, whose weights are
    ``bounds[l]:bounds[l+1]`` of the flat vector (None: no floors)."""

    count: int | None
    cost: float | None
    floors: tuple[int, ...] | None = None
    bounds: tuple[int, ...] | None = None

    def fits(self, count: int, cost: float) -> bool:
        ok_count = self.count is None or count <= self.count
        ok_cost = self.cost is None or cost <= self.cost * (1 + REL_TOL)
        return ok_count and ok_cost

    @property
    def has_floors(self) -> bool:
        return self.floors is not None and any(self.floors)

    def restricted(self, allowed: torch.Tensor) -> Budget:
        """The budget of the sub-vector ``v[allowed]`` (allowed: (p,) bool): layer bounds
        renumbered, each floor capped at what its layer still has."""
        if self.floors is None:
            return self
        counts = [int(allowed[a:b].sum()) for a, b in zip(self.bounds[:-1], self.bounds[1:],
                                                            strict=True)]
        bounds = [0]
        for c in counts:
            bounds.append(bounds[-1] + c)
        floors = tuple(min(f, c) for f, c in zip(self.floors, counts, strict=True))
        return Budget(self.count, self.cost, floors, tuple(bounds))


def costs_of(mask: torch.Tensor, groups: CostGroups) -> float:
    """Kept MACs of a flat mask under the grouped costs."""
    if hasattr(groups, "costs"):
        return float(groups.costs.to(mask.device)[mask].sum())
    return float(sum(c * sum(int(m.sum()) for m in groups.segments(mask, g))
                     for g, c in enumerate(groups.cost.tolist())))


def per_weight_costs(groups: CostGroups, device) -> torch.Tensor:
    """(p,) float64 cost of every weight."""
    if hasattr(groups, "costs"):
        return groups.costs.to(device)
    f = torch.empty(groups.p, dtype=torch.float64, device=device)
    for g, c in enumerate(groups.cost.tolist()):
        groups.put(f, g, c)
    return f


def meets_floors(mask: torch.Tensor, budget: Budget) -> bool:
    """Whether ``mask`` (p,) keeps at least each layer's floor."""
    if not budget.has_floors:
        return True
    # running counts in int32 where they fit: half the memory of int64 for (p,)
    ends = torch.cumsum(mask, 0, dtype=torch.int32 if mask.numel() < 2**31 else torch.int64)
    at = torch.tensor(budget.bounds[1:], device=mask.device) - 1
    kept = torch.diff(torch.cat([torch.zeros(1, dtype=ends.dtype, device=mask.device),
                                 ends[at.clamp_min(0)] * (at >= 0)]))
    return bool((kept >= torch.tensor(budget.floors, device=mask.device)).all())


def forced(rank: torch.Tensor, budget: Budget) -> torch.Tensor:
    """(p,) bool: the ``floors[l]`` best weights of every layer l by ``rank`` (higher is
    better)."""
    keep = torch.zeros(rank.numel(), dtype=torch.bool, device=rank.device)
    for k, a, b in zip(budget.floors, budget.bounds[:-1], budget.bounds[1:], strict=True):
        if k > 0:
            keep[a + torch.topk(rank[a:b], min(k, b - a)).indices] = True
    return keep


def _remaining(budget: Budget, keep: torch.Tensor, groups: CostGroups
               ) -> tuple[int | None, float | None]:
    count = None if budget.count is None else budget.count - int(keep.sum())
    cost = None if budget.cost is None else budget.cost - costs_of(keep, groups)
    if (count is not None and count < 0) or (cost is not None and cost < -abs(budget.cost)
                                             * REL_TOL):
        raise BudgetError("the per-layer floors exceed the budget; raise the budget or lower "
                          "min_density")
    return count, None if cost is None else max(0.0, cost)


def select_ilp(scores: torch.Tensor, groups: CostGroups, budget: Budget) -> ILPResult:
    """The ILP support of ``scores`` (p,) >= 0 under ``budget``, floors included. When the
    support without floors already meets them it is the answer (its bound bounds the
    problem with floors too); otherwise each layer's best weights up to its floor are kept
    first and the rest is solved under the remaining budgets."""
    r = solve_ilp(scores, groups, budget.count, budget.cost)
    if meets_floors(r.mask, budget):
        return r
    keep = forced(scores, budget)
    count, cost = _remaining(budget, keep, groups)
    rest = ~keep
    r = solve_ilp(scores[rest], groups.subset(rest), count, cost)
    mask = keep.clone()
    mask[rest.nonzero().reshape(-1)] = r.mask.to(mask.device)
    base = float(scores.double()[keep].sum())
    return ILPResult(mask, r.objective + base, r.upper_bound + base, int(mask.sum()),
                     costs_of(mask, groups), r.t, r.u)


def select_prefix(order: torch.Tensor, groups: CostGroups, budget: Budget) -> torch.Tensor:
    """Mask of the floors plus the longest prefix of ``order`` (indices, most important
    first) that fits the remaining budgets: the sparsity-level search of a sparsity-only
    method, done exactly."""
    p = order.numel()
    keep = torch.zeros(p, dtype=torch.bool, device=order.device)
    count, cost = budget.count, budget.cost
    if budget.has_floors:
        rank = torch.empty(p, dtype=torch.float64, device=order.device)
        rank[order] = -torch.arange(p, dtype=torch.float64, device=order.device)
        keep = forced(rank, budget)
        count, cost = _remaining(budget, keep, groups)
        order = order[~keep[order]]
    f = per_weight_costs(groups, order.device)[order]
    ok = torch.ones(order.numel(), dtype=torch.bool, device=order.device)
    if cost is not None:
        ok &= torch.cumsum(f, 0) <= cost * (1 + REL_TOL)
    if count is not None:
        ok &= torch.arange(1, order.numel() + 1, device=order.device) <= count
    k = order.numel() if bool(ok.all()) else int(torch.argmin(ok.to(torch.int8)))
    keep[order[:k]] = True
    return keep


def select_top(values: torch.Tensor, count: int, budget: Budget) -> torch.Tensor:
    """Mask of the floors (by |values|) plus the ``count`` largest |values| overall
    (a sparsity-only projection); ``count`` includes the floors."""
    keep = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    mag = values.abs()
    if budget.has_floors:
        keep = forced(mag, budget)
        mag = mag.masked_fill(keep, -1.0)
    k = count - int(keep.sum())
    if k > 0:
        keep[torch.topk(mag, min(k, values.numel())).indices] = True
    return keep
