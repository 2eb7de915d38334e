"""How many weights each layer keeps: the allocation of layer-wise pruning.

Each prunable layer l has ``numel`` weights, each taking part in ``cost`` MACs per sample,
and an error curve: its reconstruction error e_l(k) after pruning it to k kept weights, at
a grid of counts. The allocation chooses one count per layer to

    minimise  Σ_l e_l(k_l)   subject to   Σ_l cost_l k_l <= F,   Σ_l k_l <= S,

a multiple-choice knapsack with two budgets (FLOPs and non-zeros). Its relaxation is the
two-budget knapsack over the segments of each curve's lower convex hull (a layer's segments
are taken in order, since their value per weight decreases), solved by
:mod:`falcon_prune.selection.knapsack`, whose dual bound gives a certificate: no choice of
grid counts has a smaller total error than :attr:`Allocation.lower_bound`. The integral
answer takes each layer's hull prefix, then moves layers up their own grid, best error
decrease per budget used first, while both budgets hold.

:func:`uniform` (one density for every layer) and :func:`outlier_weighted` (OWL's rule:
blocks with more outlier features keep more) are the baselines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from falcon_prune.errors import BudgetError
from falcon_prune.selection.knapsack import solve_knapsack


@dataclass
class Curve:
    """Layer ``name``: ``numel`` weights of ``cost`` MACs each per sample; ``kept`` the
    grid of counts (ascending, from the least the layer may keep) and ``errors`` the
    reconstruction error at each; ``step`` the weights that go together (a structured
    unit's parameters: every count is a multiple of it)."""

    name: str
    numel: int
    cost: float
    kept: list[int]
    errors: list[float]
    step: int = 1


@dataclass
class Allocation:
    """The kept count of every layer, the total error of the choice, and the certificate
    (a lower bound of the least total error any choice of grid counts has)."""

    kept: dict[str, int]
    error: float
    lower_bound: float

    @property
    def gap(self) -> float:
        return max(0.0, self.error - self.lower_bound)


def _hull(kept: list[int], errors: list[float]) -> list[int]:
    """Indices of the lower convex hull of the points (kept, error), from the first."""
    out: list[int] = []
    for i in range(len(kept)):
        while len(out) >= 2:
            a, b = out[-2], out[-1]
            cross = ((kept[b] - kept[a]) * (errors[i] - errors[a])
                     - (errors[b] - errors[a]) * (kept[i] - kept[a]))
            if cross > 0:
                break
            out.pop()
        out.append(i)
    return out


def _check_floors(curves: list[Curve], F: float, S: float) -> None:
    cost = sum(c.cost * c.kept[0] for c in curves)
    count = sum(c.kept[0] for c in curves)
    if cost > F * (1 + 1e-12) or count > S:
        raise BudgetError(
            f"the least each layer keeps ({count:,} weights, {cost:,.0f} MACs per sample) is "
            f"over the budgets ({S:,.0f} weights, {F:,.0f} MACs); raise the budgets or lower "
            "min_density")


def allocate(curves: list[Curve], max_macs: float | None, max_weights: float | None
             ) -> Allocation:
    """The counts of least total error under both budgets (None: no limit)."""
    F = math.inf if max_macs is None else float(max_macs)
    S = math.inf if max_weights is None else float(max_weights)
    _check_floors(curves, F, S)
    items = []  # (layer, hull point reached)
    values, costs, sizes = [], [], []
    for li, c in enumerate(curves):
        hull = _hull(c.kept, c.errors)
        for a, b in zip(hull, hull[1:], strict=False):
            items.append((li, b))
            values.append(max(0.0, c.errors[a] - c.errors[b]))
            sizes.append(c.kept[b] - c.kept[a])
            costs.append(c.cost * (c.kept[b] - c.kept[a]))
    base_cost = sum(c.cost * c.kept[0] for c in curves)
    base_count = sum(c.kept[0] for c in curves)
    base_error = sum(c.errors[0] for c in curves)
    choice = [0] * len(curves)
    bound = 0.0
    if items:
        r = solve_knapsack(torch.tensor(values, dtype=torch.float64),
                           torch.tensor(costs, dtype=torch.float64),
                           torch.tensor(sizes, dtype=torch.float64),
                           None if F == math.inf else F - base_cost,
                           None if S == math.inf else S - base_count)
        bound = r.upper_bound
        taken = [0.0] * len(curves)
        for (li, _), size, on in zip(items, sizes, r.mask.tolist(), strict=True):
            taken[li] += size if on else 0.0
        for (li, b), _ in zip(items, sizes, strict=True):  # each layer's hull prefix
            if curves[li].kept[b] - curves[li].kept[0] <= taken[li]:
                choice[li] = max(choice[li], b)
    choice = _fill(curves, choice, F, S)
    kept = {c.name: c.kept[j] for c, j in zip(curves, choice, strict=True)}
    error = sum(c.errors[j] for c, j in zip(curves, choice, strict=True))
    return Allocation(kept, error, base_error - bound)


def _fill(curves: list[Curve], choice: list[int], F: float, S: float) -> list[int]:
    """Move layers up their grids, the largest error decrease per budget used first,
    while both budgets hold."""
    choice = list(choice)
    cost = sum(c.cost * c.kept[j] for c, j in zip(curves, choice, strict=True))
    count = sum(c.kept[j] for c, j in zip(curves, choice, strict=True))
    while True:
        best, best_ratio = None, 0.0
        for li, c in enumerate(curves):
            for j in range(choice[li] + 1, len(c.kept)):
                dk = c.kept[j] - c.kept[choice[li]]
                if cost + c.cost * dk > F * (1 + 1e-12) or count + dk > S:
                    break
                use = (c.cost * dk / F if F < math.inf else 0.0) + (dk / S if S < math.inf
                                                                     else 0.0)
                gain = c.errors[choice[li]] - c.errors[j]
                ratio = gain / max(use, 1e-300)
                if gain > 0 and ratio > best_ratio:
                    best, best_ratio = (li, j, dk), ratio
        if best is None:
            return choice
        li, j, dk = best
        choice[li] = j
        cost += curves[li].cost * dk
        count += dk


def uniform(curves: list[Curve], max_macs: float | None, max_weights: float | None
            ) -> dict[str, int]:
    """One kept fraction for every layer, the largest both budgets allow, each count the
    nearest whole step (never below a layer's least); then what rounding left of the
    budgets goes to the layers that can take it, by one more fraction rounded down. A layer
    of 3 units (3 attention head groups) keeps 2 at a fraction of 0.7, and the MLP's
    channels take what that leaves, instead of every layer stopping at the coarsest one's
    step."""
    F = math.inf if max_macs is None else float(max_macs)
    S = math.inf if max_weights is None else float(max_weights)
    _check_floors(curves, F, S)
    first = _largest(curves, {}, F, S, nearest=True)
    return _largest(curves, first, F, S, nearest=False)


def _counts(curves: list[Curve], d: float, floor: dict[str, int], nearest: bool
            ) -> dict[str, int]:
    """Each layer's count at kept fraction ``d``: ``d`` x numel to the nearest (else the
    lower) whole step, within [its least count or ``floor``, numel]."""
    rnd = (lambda v: math.floor(v + 0.5)) if nearest else (lambda v: math.floor(v + 1e-9))
    return {c.name: max(c.kept[0], floor.get(c.name, 0),
                        min(c.numel, c.step * rnd(d * c.numel / c.step))) for c in curves}


def _largest(curves: list[Curve], floor: dict[str, int], F: float, S: float, nearest: bool
             ) -> dict[str, int]:
    """The counts (:func:`_counts`) at the largest fraction within both budgets, by
    bisection (the counts rise with the fraction); ``floor`` must fit."""
    def fits(kept: dict[str, int]) -> bool:
        cost = sum(c.cost * kept[c.name] for c in curves)
        return cost <= F * (1 + 1e-12) and sum(kept.values()) <= S

    lo, hi = 0.0, 1.0
    if fits(_counts(curves, hi, floor, nearest)):
        return _counts(curves, hi, floor, nearest)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(_counts(curves, mid, floor, nearest)) else (lo, mid)
    return _counts(curves, lo, floor, nearest)


def _scaled(curves: list[Curve], density: dict[str, float], F: float, S: float
            ) -> dict[str, int]:
    """Counts floor(density x numel) (at least each layer's least; whole steps), scaled
    down together until both budgets hold."""
    scale = 1.0
    while True:
        kept = {c.name: max(c.kept[0], min(c.numel, c.step * math.floor(
            scale * density[c.name] * c.numel / c.step + 1e-9))) for c in curves}
        cost = sum(c.cost * kept[c.name] for c in curves)
        if cost <= F * (1 + 1e-12) and sum(kept.values()) <= S:
            return kept
        scale *= 0.999


def outlier_weighted(curves: list[Curve], groups: dict[str, int], outliers: dict[int, float],
                     max_macs: float | None, max_weights: float | None, spread: float = 0.08
                     ) -> dict[str, int]:
    """OWL's allocation: block ``groups[name]`` of every layer gets a kept fraction that
    rises with its share of outlier features ``outliers[block]``, within ``spread`` of the
    uniform fraction and with the same total, then scaled into the budgets."""
    base = uniform(curves, max_macs, max_weights)
    target = sum(base.values()) / sum(c.numel for c in curves)
    lo, hi = min(outliers.values()), max(outliers.values())
    shift = {b: spread * (2 * (o - lo) / (hi - lo) - 1) if hi > lo else 0.0
             for b, o in outliers.items()}
    numel = {b: sum(c.numel for c in curves if groups[c.name] == b) for b in outliers}
    mean = sum(shift[b] * numel[b] for b in outliers) / sum(numel.values())
    density = {c.name: min(1.0, max(0.0, target + shift[groups[c.name]] - mean))
               for c in curves}
    F = math.inf if max_macs is None else float(max_macs)
    S = math.inf if max_weights is None else float(max_weights)
    return _scaled(curves, density, F, S)
