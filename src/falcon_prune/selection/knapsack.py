"""A 0/1 knapsack with two weighted budgets, for choosing channel units.

    maximise  Σ v_i z_i   subject to   Σ c_i z_i <= F,   Σ s_i z_i <= S,   z ∈ {0, 1}^m,

with values ``v >= 0``, costs ``c >= 0`` (MACs) and sizes ``s >= 0`` (parameters). Unlike
the weight-level program of :mod:`falcon_prune.selection.ilp`, every item counts with its own size
toward the second budget, and there are few items (units, not weights), so a direct
method serves: the Lagrangian dual of the relaxation,

    D(t, u) = t F + u S + Σ_i max(0, v_i - t c_i - u s_i),      t, u >= 0,

bounds every feasible value. For a fixed ``t`` the best ``u`` is a weighted quantile of the
ratios (v_i - t c_i) / s_i (one sort); ``t`` is found by a zooming grid search on the convex
``min_u D(t, u)``. The integral answer takes the items of positive reduced value in
decreasing order while both budgets hold, then fills what is left by value per unit of the
binding budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_GRID, _ROUNDS = 16, 11


@dataclass
class KnapsackResult:
    """``mask`` (m,) bool; ``objective`` its value; ``upper_bound`` the dual bound;
    ``cost`` and ``size`` its use of the two budgets."""

    mask: torch.Tensor
    objective: float
    upper_bound: float
    cost: float
    size: float

    @property
    def gap(self) -> float:
        return max(0.0, self.upper_bound - self.objective)


def _best_u(a: torch.Tensor, s: torch.Tensor, S: float) -> tuple[float, float]:
    """(min over u >= 0 of u S + Σ max(0, a_i - u s_i), its u) for one t."""
    if not math.isfinite(S):
        return float(a.clamp_min(0).sum()), 0.0
    pos = a > 0
    free = pos & (s <= 0)
    a_p, s_p = a[pos & (s > 0)], s[pos & (s > 0)]
    base = float(a[free].sum())
    if a_p.numel() == 0 or float(s_p.sum()) <= S:
        return base + float(a_p.sum()), 0.0
    r = a_p / s_p
    order = torch.argsort(r, descending=True)
    r, a_p, s_p = r[order], a_p[order], s_p[order]
    k = int(torch.searchsorted(torch.cumsum(s_p, 0), torch.tensor(S, dtype=s_p.dtype)))
    u = float(r[min(k, len(r) - 1)])
    return base + u * S + float((a_p - u * s_p).clamp_min(0).sum()), u


def _dual(v, c, s, F: float, S: float, t: float) -> tuple[float, float]:
    val, u = _best_u(v - t * c, s, S)
    return val + (t * F if math.isfinite(F) else 0.0), u


def _take(order: torch.Tensor, c, s, F: float, S: float, mask: torch.Tensor,
          used: list[float]) -> None:
    """Add the items of ``order`` in turn while both budgets hold."""
    for i in order.tolist():
        ci, si = float(c[i]), float(s[i])
        if used[0] + ci <= F * (1 + 1e-12) and used[1] + si <= S * (1 + 1e-12):
            mask[i] = True
            used[0] += ci
            used[1] += si


def solve_knapsack(values: torch.Tensor, costs: torch.Tensor, sizes: torch.Tensor,
                   max_cost: float | None, max_size: float | None) -> KnapsackResult:
    """Solve the knapsack above on the CPU in float64; ``None`` budgets are absent."""
    v, c, s = (x.detach().to("cpu", torch.float64) for x in (values, costs, sizes))
    F = math.inf if max_cost is None else float(max_cost)
    S = math.inf if max_size is None else float(max_size)
    best, t_best, u_best = math.inf, 0.0, 0.0
    if math.isfinite(F) and bool((c > 0).any()):
        lo, hi = 0.0, float((v[c > 0] / c[c > 0]).max()) * (1 + 1e-9) + 1e-300
        for _ in range(_ROUNDS):
            grid = torch.linspace(lo, hi, _GRID + 1, dtype=torch.float64).tolist()
            vals = [_dual(v, c, s, F, S, t) for t in grid]
            j = min(range(len(grid)), key=lambda k: vals[k][0])
            if vals[j][0] < best:
                best, t_best, u_best = vals[j][0], grid[j], vals[j][1]
            lo, hi = grid[max(j - 1, 0)], grid[min(j + 1, _GRID)]
    else:
        best, u_best = _dual(v, c, s, F, S, 0.0)
    mask = torch.zeros(len(v), dtype=torch.bool)
    used = [0.0, 0.0]
    red = v - t_best * c - u_best * s
    _take(torch.argsort(red, descending=True)[: int((red > 0).sum())], c, s, F, S, mask, used)
    ratio = v / (c / max(F, 1e-300) + s / max(S, 1e-300) + 1e-300) if math.isfinite(F) \
        and math.isfinite(S) else (v / (c + 1e-300) if math.isfinite(F) else v / (s + 1e-300))
    rest = (~mask).nonzero().reshape(-1)
    _take(rest[torch.argsort(ratio[rest], descending=True)], c, s, F, S, mask, used)
    obj = float(v[mask].sum())
    fits = (c <= F * (1 + 1e-12)) & (s <= S * (1 + 1e-12))
    if bool(fits.any()):  # greedy rounding can lose to the best single item
        j = int(torch.argmax(torch.where(fits, v, torch.full_like(v, -1.0))))
        if float(v[j]) > obj:
            mask = torch.zeros_like(mask)
            mask[j] = True
            obj, used = float(v[j]), [float(c[j]), float(s[j])]
    return KnapsackResult(mask, obj, max(best, obj), used[0], used[1])
