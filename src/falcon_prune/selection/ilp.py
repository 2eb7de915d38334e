"""The knapsack-type integer program behind FLOP-aware magnitude pruning (docs/method.md).

Given scores ``I >= 0`` (p,), per-weight costs ``f >= 0`` (p,), a count budget ``S`` and a
cost budget ``F``::

    maximise  sum_i I_i z_i   subject to   sum_i z_i <= S,   sum_i f_i z_i <= F,   z in {0,1}^p.

The solver works on the Lagrangian dual of the LP relaxation,

    D(t, u) = t F + u S + sum_i max(0, I_i - t f_i - u),      t, u >= 0,

which is a valid upper bound on the LP (hence on the integer) optimum for *every* (t, u).
Weights are grouped by cost (for a network, one group per distinct per-layer cost, so a few
groups); each group is sorted once per solve, after which the number and the sum of the items
above any threshold are one binary search per group. Both multipliers are found by
vectorised K-ary search on the (monotone) budget usage, so one solve costs one sort of the
scores plus a few hundred ``searchsorted`` calls on tiny arrays. The integral answer takes
every item above the final thresholds (it meets both budgets by construction) and then fills
the remaining budget greedily by reduced score ``I_i - t f_i``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from falcon_prune.errors import ConfigError, ConfigTypeError
from falcon_prune.selection.groups import CostGroups, FlatCosts

_GRID_T = 32  # points per K-ary search round on the cost multiplier t
_GRID_U = 128  # points per K-ary search round on the count multiplier u
_ROUNDS = 12  # at most; a search stops once its bracket is below _RTOL of its start
_RTOL = 1e-12


@dataclass
class ILPResult:
    """Integral support and its certificate.

    ``mask`` (p,) bool in the caller's order; ``objective`` the value sum I_i z_i of the mask;
    ``upper_bound`` a proven upper bound on the LP optimum (so on every feasible support);
    ``gap = upper_bound - objective >= 0``; ``kept`` and ``cost`` the mask's usage of the two
    budgets; ``t`` and ``u`` the multipliers of the cost and count constraints.
    """

    mask: torch.Tensor
    objective: float
    upper_bound: float
    kept: int
    cost: float
    t: float
    u: float

    @property
    def gap(self) -> float:
        return max(0.0, self.upper_bound - self.objective)

    @property
    def relative_gap(self) -> float:
        return self.gap / self.upper_bound if self.upper_bound > 0 else 0.0


def _check_scores(scores: torch.Tensor, p: int) -> torch.Tensor:
    scores = torch.as_tensor(scores)
    if scores.numel() != p:
        raise ConfigError(f"scores has {scores.numel()} entries but the costs describe {p} weights")
    scores = scores.reshape(-1).to(torch.float64)
    if not torch.isfinite(scores).all():
        raise ConfigError(
            "scores contain NaN or inf; check the weights or gradients they came from")
    if (scores < 0).any():
        raise ConfigError("scores must be >= 0 (e.g. squared weights)")
    return scores


def _check_budget(value: float | None, name: str) -> float:
    if value is None:
        return math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ConfigTypeError(f"{name} must be a number >= 0 or None, got {value!r}")
    if value < 0:
        raise ConfigError(f"{name} must be >= 0, got {value}")
    return float(value)


def solve_ilp(
    scores: torch.Tensor,
    costs: torch.Tensor | CostGroups,
    max_count: int | None,
    max_cost: float | None,
) -> ILPResult:
    """Solve the ILP above; ``None`` budgets are absent. Returns an :class:`ILPResult`.

    ``scores`` (p,) >= 0; ``costs`` (p,) >= 0 or a prebuilt :class:`CostGroups`.
    The returned mask never exceeds either budget.
    """
    groups = costs if isinstance(costs, CostGroups) else CostGroups.from_costs(costs)
    scores = _check_scores(scores, groups.p)
    S = _check_budget(max_count, "max_count")
    F = _check_budget(max_cost, "max_cost")
    if isinstance(groups, FlatCosts):
        return _search(_FlatSolver(scores, groups.costs.to(scores.device)), S, F)
    return _GroupedSolver(scores, groups).solve(S, F)


def _sort_values(x: torch.Tensor) -> torch.Tensor:
    """x (n,) float64 sorted ascending (values only): numpy's SIMD sort on the CPU, which is
    several times faster than an argsort there, in place (x is a temporary: no second
    copy); torch.sort elsewhere."""
    if x.device.type == "cpu":
        x.numpy().sort()
        return x
    return torch.sort(x).values


def _top_k_masks(segments: list[torch.Tensor], asc: torch.Tensor, k: int
                 ) -> list[torch.Tensor]:
    """Boolean masks of the k largest entries of the concatenated ``segments`` (1-D, whose
    ascending sort is ``asc``), one per segment; of entries tied at the boundary, the first
    ones (by position) are taken. No concatenated copy is made."""
    n = asc.numel()
    if k <= 0 or k >= n:
        return [torch.full(s.shape, k > 0, dtype=torch.bool, device=s.device) for s in segments]
    edge = asc[n - k]  # the smallest kept value
    masks = [s > edge for s in segments]
    short = k - sum(int(m.sum()) for m in masks)
    for s, m in zip(segments, masks, strict=True):
        if short <= 0:
            break
        tied = (s == edge).nonzero().flatten()[:short]
        m[tied] = True
        short -= tied.numel()
    return masks


class _GroupedSolver:
    """One solve on grouped costs: per-group ascending sorts of the scores and their prefix
    sums. Only values are sorted; the final support is read off by thresholds."""

    def __init__(self, scores: torch.Tensor, groups: CostGroups):
        self.device = scores.device
        self.scores = scores
        self.c = groups.cost.to(self.device)  # (G,)
        self.groups = groups
        self.asc: list[torch.Tensor] = []
        self.cum: list[torch.Tensor] = []  # (n_g + 1,) prefix sums of asc, leading 0
        for g in range(len(groups)):
            vals = _sort_values(groups.gather(scores, g))  # a copy, sorted in place
            self.asc.append(vals)
            cum = torch.empty(len(vals) + 1, dtype=vals.dtype, device=self.device)
            cum[0] = 0
            torch.cumsum(vals, 0, out=cum[1:])
            self.cum.append(cum)
        self.n = torch.tensor([len(a) for a in self.asc], dtype=torch.float64, device=self.device)
        self.top = torch.stack([a[-1] for a in self.asc])  # (G,) max score per group
        self.p = groups.p

    # -- counting -------------------------------------------------------------------------
    def _above(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """theta (..., G) thresholds -> (count, sum) of items strictly above, each (..., G)."""
        counts, sums = [], []
        for g, (asc, cum) in enumerate(zip(self.asc, self.cum, strict=True)):
            th = theta[..., g].contiguous()
            below = torch.searchsorted(asc, th, right=True)
            counts.append(len(asc) - below)
            sums.append(cum[-1] - cum[below])
        return torch.stack(counts, -1).to(torch.float64), torch.stack(sums, -1)

    def _dual(self, t: torch.Tensor, u: torch.Tensor, S: float, F: float):
        """t, u (...,) -> D(t, u), count, cost, per-group counts (..., G)."""
        theta = t[..., None] * self.c + u[..., None]
        k, s = self._above(theta)
        count = k.sum(-1)
        cost = (k * self.c).sum(-1)
        D = (s - theta * k).sum(-1)
        if math.isfinite(F):
            D = D + t * F
        if math.isfinite(S):
            D = D + u * S
        return D, count, cost, k

    def _best_u(self, t: torch.Tensor, S: float) -> torch.Tensor:
        """For each t (K,), the smallest u >= 0 with at most S items above (float resolution)."""
        u0 = torch.zeros_like(t)
        if not math.isfinite(S):
            return u0
        k, _ = self._above(t[:, None] * self.c)
        need = k.sum(-1) > S
        if not need.any():
            return u0
        lo = torch.zeros_like(t)
        hi = (self.top - t[:, None] * self.c).amax(-1).clamp_min(0)  # nothing above hi
        frac = torch.linspace(0, 1, _GRID_U + 1, dtype=torch.float64, device=self.device)[1:]
        tol = float(hi.max()) * _RTOL
        for _ in range(_ROUNDS):
            grid = lo[:, None] + (hi - lo)[:, None] * frac  # (K, GRID)
            k, _ = self._above(t[:, None, None] * self.c + grid[..., None])
            ok = k.sum(-1) <= S  # monotone in u; last column always ok
            j = torch.argmax(ok.to(torch.int8), dim=1)
            new_hi = grid.gather(1, j[:, None])[:, 0]
            new_lo = torch.where(j > 0, grid.gather(1, (j - 1).clamp_min(0)[:, None])[:, 0], lo)
            lo, hi = new_lo, new_hi
            if float((hi - lo).max()) <= tol:
                break
        return torch.where(need, hi, u0)

    # -- solve ------------------------------------------------------------------------------
    def evaluate(self, t: torch.Tensor, S: float, F: float):
        """t (K,) -> D(t, u*(t)), u*(t), and the strict support's count and cost, each (K,)."""
        u = self._best_u(t, S)
        D, count, cost, _ = self._dual(t, u, S, F)
        return D, u, count, cost

    def t_max(self) -> float:
        """A multiplier beyond which no item of positive cost has a positive reduced score."""
        positive = self.c > 0
        return float((self.top[positive] / self.c[positive]).max()) if positive.any() else 0.0

    def solve(self, S: float, F: float) -> ILPResult:
        return _search(self, S, F)

    def _integral(self, t: float, u: float, S: float, F: float, upper: float) -> ILPResult:
        """Items above the thresholds (t, u), then greedy fill of the leftover budgets."""
        theta = t * self.c + u
        k, _ = self._above(theta[None])
        k = k[0].to(torch.int64).tolist()
        count = sum(k)
        cost = float(sum(kg * cg for kg, cg in zip(k, self.c.tolist(), strict=True)))
        # greedy fill by reduced score I_i - t f_i: within a group the candidates are the
        # next items of its sorted list, and as they share one cost, the group's taken items
        # are a prefix of them; so only how many each group adds is needed
        cand_group, cand_score, cand_cost = [], [], []
        for g, asc in enumerate(self.asc):
            rest = len(asc) - k[g]
            cg = float(self.c[g])
            cap = min(rest, S - count, (F - cost) / cg if cg > 0 else math.inf)
            m = int(max(0, math.floor(cap)))
            if m:
                cand_group.append(torch.full((m,), g, dtype=torch.int64, device=self.device))
                cand_score.append(asc[rest - m : rest].flip(0) - t * cg)
                cand_cost.append(torch.full((m,), cg, dtype=torch.float64, device=self.device))
        if cand_group:
            grp, red, cc = torch.cat(cand_group), torch.cat(cand_score), torch.cat(cand_cost)
            order = torch.argsort(red, descending=True, stable=True)
            grp, cc = grp[order], cc[order]
            taken, count, cost = _greedy_fill(cc, S - count, F - cost, count, cost)
            added = torch.bincount(grp[taken], minlength=len(self.asc)).tolist()
            k = [kg + a for kg, a in zip(k, added, strict=True)]
        mask = torch.zeros(self.p, dtype=torch.bool, device=self.device)
        objective = 0.0
        for g, (asc, cum, kg) in enumerate(zip(self.asc, self.cum, k, strict=True)):
            if kg:
                segments = self.groups.segments(self.scores, g)
                self.groups.put(mask, g, _top_k_masks(segments, asc, kg))
                objective += float(cum[-1] - cum[len(asc) - kg])  # the kg largest scores
        return ILPResult(mask, objective, max(upper, objective), count, cost, t, u)


def _greedy_fill(
    cost: torch.Tensor, s_left: float, f_left: float, count: int, used: float
) -> tuple[torch.Tensor, int, float]:
    """Take items (in the given order) while both leftover budgets hold, skipping misfits.

    Vectorised as repeated 'longest fitting prefix' passes; each pass removes at least one
    cost level, so there are at most (#distinct costs + 1) passes. Returns (taken mask,
    new count, new used cost).
    """
    taken = torch.zeros(cost.numel(), dtype=torch.bool, device=cost.device)
    alive = torch.ones_like(taken)
    while s_left >= 1 and alive.any():
        alive &= cost <= f_left
        alive &= ~taken
        pos = torch.nonzero(alive).flatten()
        if pos.numel() == 0:
            break
        c = cost[pos]
        fits = (torch.cumsum(c, 0) <= f_left) & (
            torch.arange(1, pos.numel() + 1, device=cost.device) <= s_left
        )
        n_take = int(torch.argmin(fits.to(torch.int8))) if not fits.all() else pos.numel()
        if n_take == 0:
            alive[pos[0]] = False
            continue
        take = pos[:n_take]
        taken[take] = True
        used_now = float(c[:n_take].sum())
        s_left -= n_take
        f_left -= used_now
        count += n_take
        used += used_now
    return taken, count, used


def _search(ev, S: float, F: float) -> ILPResult:
    """Minimise the convex dual D(t) by K-ary zooming, then round at the right end of the
    final bracket, where every inner LP solution meets the cost budget."""
    dev = ev.device
    zero = torch.zeros(1, dtype=torch.float64, device=dev)
    D, u, count, cost = ev.evaluate(zero, S, F)
    upper = float(D)
    if not math.isfinite(F) or ev.t_max() == 0.0:
        return ev._integral(0.0, float(u), S, F, upper)
    t_top = ev.t_max() * (1 + 1e-9) + 1e-300
    frac = torch.linspace(0, 1, _GRID_T + 1, dtype=torch.float64, device=dev)
    lo, hi = 0.0, t_top
    for _ in range(_ROUNDS):
        grid = lo + (hi - lo) * frac
        D, u, count, cost = ev.evaluate(grid, S, F)
        upper = min(upper, float(D.min()))
        j = int(torch.argmin(D))
        lo, hi = float(grid[max(j - 1, 0)]), float(grid[min(j + 1, _GRID_T)])
        if hi - lo <= t_top * _RTOL:
            break
    t = torch.tensor([hi], dtype=torch.float64, device=dev)
    _, u, count, cost = ev.evaluate(t, S, F)
    if float(cost) > F:
        # rounding noise put hi left of the minimiser: move right until the support fits
        lo, hi = hi, t_top
        for _ in range(_ROUNDS):
            grid = lo + (hi - lo) * frac
            _, ug, _, cg = ev.evaluate(grid, S, F)
            j = int(torch.argmax((cg <= F).to(torch.int8)))  # cost is non-increasing in t
            lo, hi = float(grid[max(j - 1, 0)]), float(grid[j])
            u = ug[j : j + 1]
            if hi - lo <= t_top * _RTOL:
                break
    return ev._integral(hi, float(u), S, F, upper)


class _FlatSolver:
    """Arbitrary per-weight costs: each dual evaluation is one top-S selection, O(p)."""

    def __init__(self, scores: torch.Tensor, costs: torch.Tensor):
        self.scores, self.costs, self.device = scores, costs, scores.device
        self.p = scores.numel()

    def t_max(self) -> float:
        pos = self.costs > 0
        return float((self.scores[pos] / self.costs[pos]).max()) if pos.any() else 0.0

    def _one(self, t: float, S: float, F: float):
        red = self.scores - t * self.costs
        u = 0.0
        if math.isfinite(S) and S < self.p:
            # the S-th largest reduced score (the largest when S = 0): at most S lie above
            u = max(0.0, float(torch.topk(red, max(int(S), 1)).values[-1]))
        sel = red > u
        D = float((red[sel] - u).sum())
        D += u * S if math.isfinite(S) else 0.0
        D += t * F if math.isfinite(F) else 0.0
        return D, u, float(sel.sum()), float(self.costs[sel].sum())

    def evaluate(self, t: torch.Tensor, S: float, F: float):
        rows = [self._one(float(x), S, F) for x in t]
        return tuple(
            torch.tensor(col, dtype=torch.float64, device=self.device)
            for col in zip(*rows, strict=True)
        )

    def _integral(self, t: float, u: float, S: float, F: float, upper: float) -> ILPResult:
        red = self.scores - t * self.costs
        sel = red > u
        count, used = int(sel.sum()), float(self.costs[sel].sum())
        rest = torch.nonzero(~sel).flatten()
        order = rest[torch.argsort(red[rest], descending=True, stable=True)]
        taken, count, used = _greedy_fill(self.costs[order], S - count, F - used, count, used)
        mask = sel.clone()
        mask[order[taken]] = True
        objective = float(self.scores[mask].sum())
        return ILPResult(mask, objective, max(upper, objective), count, used, t, u)
