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
decrease per budget used first, while both budgets hold, then tries lowering each layer
by one count and filling again while that lowers the total error.

The second budget may count something other than the weights: a curve's ``sizes`` give
its use at each count (a latency budget's predicted seconds, measured, so not
proportional to the count). The knapsack then prices each hull segment by its sizes; the
certificate holds for the choices on the hulls, with the sizes between grid counts
interpolated linearly.

:func:`uniform` (one density for every layer) and :func:`outlier_weighted` (OWL's rule:
blocks with more outlier features keep more) are the baselines.
"""

from __future__ import annotations

import bisect
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
    #: the second budget's use at each count of ``kept`` when it is not the count itself
    #: (parameters): a latency budget's predicted seconds, non-decreasing
    sizes: list[float] | None = None

    def size(self, k: int) -> float:
        """The second budget's use at count ``k``: ``k`` itself, or ``sizes``
        interpolated linearly between the grid's counts."""
        if self.sizes is None:
            return float(k)
        j = bisect.bisect_left(self.kept, k)
        if j < len(self.kept) and self.kept[j] == k:
            return self.sizes[j]
        j = min(max(j, 1), len(self.kept) - 1)
        a, b = self.kept[j - 1], self.kept[j]
        w = (k - a) / (b - a)
        return self.sizes[j - 1] + w * (self.sizes[j] - self.sizes[j - 1])


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
    count = sum(c.size(c.kept[0]) for c in curves)
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
    values, costs, sizes, counts = [], [], [], []
    for li, c in enumerate(curves):
        hull = _hull(c.kept, c.errors)
        for a, b in zip(hull, hull[1:], strict=False):
            items.append((li, b))
            values.append(max(0.0, c.errors[a] - c.errors[b]))
            sizes.append(c.size(c.kept[b]) - c.size(c.kept[a]))
            counts.append(c.kept[b] - c.kept[a])
            costs.append(c.cost * counts[-1])
    base_cost = sum(c.cost * c.kept[0] for c in curves)
    base_count = sum(c.size(c.kept[0]) for c in curves)
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
        for (li, _), dk, on in zip(items, counts, r.mask.tolist(), strict=True):
            taken[li] += dk if on else 0.0
        for li, b in items:  # each layer's hull prefix
            if curves[li].kept[b] - curves[li].kept[0] <= taken[li]:
                choice[li] = max(choice[li], b)
    choice = _exchange(curves, _fill(curves, _trim(curves, choice, S), F, S), F, S)
    kept = {c.name: c.kept[j] for c, j in zip(curves, choice, strict=True)}
    error = sum(c.errors[j] for c, j in zip(curves, choice, strict=True))
    return Allocation(kept, error, base_error - bound)


def _trim(curves: list[Curve], choice: list[int], S: float) -> list[int]:
    """Lower layers one grid count at a time, the least error added per size freed
    first, until the second budget holds (a hull prefix can pass it only when the sizes
    are not proportional to the counts)."""
    choice = list(choice)
    while sum(c.size(c.kept[j]) for c, j in zip(curves, choice, strict=True)) > \
            S * (1 + 1e-12):
        _, li = min(((c.errors[j - 1] - c.errors[j]) / max(
            c.size(c.kept[j]) - c.size(c.kept[j - 1]), 1e-300), li)
            for li, (c, j) in enumerate(zip(curves, choice, strict=True)) if j > 0)
        choice[li] -= 1
    return choice


def _exchange(curves: list[Curve], choice: list[int], F: float, S: float) -> list[int]:
    """Lower one layer by one grid count and refill (:func:`_fill`) while that lowers
    the total error (at most 4 passes over the layers): what the greedy fill leaves when
    a budget's sizes are not proportional to the counts."""
    def total(ch: list[int]) -> float:
        return sum(c.errors[j] for c, j in zip(curves, ch, strict=True))

    best = total(choice)
    for _ in range(4):
        better = False
        for li in range(len(curves)):
            if choice[li] == 0:
                continue
            trial = list(choice)
            trial[li] -= 1
            trial = _fill(curves, trial, F, S)
            if total(trial) < best - 1e-12 * max(1.0, abs(best)):
                choice, best, better = trial, total(trial), True
        if not better:
            return choice
    return choice


def _fill(curves: list[Curve], choice: list[int], F: float, S: float) -> list[int]:
    """Move layers up their grids, the largest error decrease per budget used first,
    while both budgets hold."""
    choice = list(choice)
    cost = sum(c.cost * c.kept[j] for c, j in zip(curves, choice, strict=True))
    count = sum(c.size(c.kept[j]) for c, j in zip(curves, choice, strict=True))
    while True:
        best, best_ratio = None, 0.0
        for li, c in enumerate(curves):
            for j in range(choice[li] + 1, len(c.kept)):
                dk = c.kept[j] - c.kept[choice[li]]
                ds = c.size(c.kept[j]) - c.size(c.kept[choice[li]])
                if cost + c.cost * dk > F * (1 + 1e-12) or count + ds > S * (1 + 1e-12):
                    break
                use = (c.cost * dk / F if F < math.inf else 0.0) + (
                    max(ds, 0.0) / S if S < math.inf else 0.0)
                gain = c.errors[choice[li]] - c.errors[j]
                ratio = gain / max(use, 1e-300)
                if gain > 0 and ratio > best_ratio:
                    best, best_ratio = (li, j, dk, ds), ratio
        if best is None:
            return choice
        li, j, dk, ds = best
        choice[li] = j
        cost += curves[li].cost * dk
        count += ds


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


def _counts(curves: list[Curve], d: float, floor: dict[str, int], nearest: bool,
            density: dict[str, float] | None = None) -> dict[str, int]:
    """Each layer's count at kept fraction ``d`` (times its ``density``, 1 by default):
    that share of its numel to the nearest (else the lower) whole step, within [its least
    count or ``floor``, numel]."""
    rnd = (lambda v: math.floor(v + 0.5)) if nearest else (lambda v: math.floor(v + 1e-9))
    share = density or {}
    return {c.name: max(c.kept[0], floor.get(c.name, 0), min(c.numel, c.step * rnd(
        d * share.get(c.name, 1.0) * c.numel / c.step))) for c in curves}


def _largest(curves: list[Curve], floor: dict[str, int], F: float, S: float, nearest: bool,
             density: dict[str, float] | None = None) -> dict[str, int]:
    """The counts (:func:`_counts`) at the largest fraction within both budgets, by
    bisection (the counts rise with the fraction); ``floor`` must fit."""
    def at(d: float) -> dict[str, int]:
        return _counts(curves, d, floor, nearest, density)

    def fits(kept: dict[str, int]) -> bool:
        cost = sum(c.cost * kept[c.name] for c in curves)
        return cost <= F * (1 + 1e-12) and sum(c.size(kept[c.name]) for c in curves) <= S

    lo, hi = 0.0, 1.0
    if fits(at(hi)):
        return at(hi)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(at(mid)) else (lo, mid)
    return at(lo)


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
    return _largest(curves, {}, F, S, nearest=False, density=density)
