"""Choosing channel units (structure='channels') the FALCON way, and its baselines.

A unit (:mod:`falcon_prune.structure`) removes a set of weights at once. The methods:

- ``mp``: group magnitude: the units by decreasing ``Σ w²`` of their weights, the longest
  prefix that fits the budgets;
- ``mp_flops``: the two-budget knapsack (:mod:`falcon_prune.knapsack`) on the same scores;
- ``falcon``: warm starts from the knapsack on group magnitude and on the group OBS
  saliency (the increase of the quadratic model Q when a unit's weights are removed and
  every other weight compensates optimally), weighted by each unit's MACs per weight to a
  power β; each is back-solved (Q minimised on the weights that survive) and scored on
  held-out samples; optional iterative hard thresholding whose projection is the knapsack
  over unit indicators.

Costs couple units (a weight dies with either of its two units), so a selection is made
on costs linearised at the current choice, re-linearised a few times, then repaired and
filled with exact recounts: the chosen units never exceed a budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from falcon_prune.knapsack import solve_knapsack
from falcon_prune.latency import LatencyTable
from falcon_prune.quadratic import QuadraticModel
from falcon_prune.solvers import SolverOptions, SolverResult, SolverTrace, refine, timed
from falcon_prune.structure import ChannelUnits


@dataclass(frozen=True)
class UnitBudget:
    """Absolute budgets on units: kept MACs per sample (``cost``), kept parameters
    (``size``) and predicted seconds per forward (``latency``, with a
    :class:`~falcon_prune.latency.LatencyTable`), None for no limit; ``floors`` (G,) the
    least units kept per group."""

    cost: float | None
    size: float | None
    floors: torch.Tensor
    latency: float | None = None


class UnitCosts:
    """Exact and marginal MACs and parameters of unit choices. ``entry_cost`` (P,) is the
    MACs per sample of each parameter entry (0 for entries that are not prunable
    weights); every entry counts 1 parameter."""

    def __init__(self, units: ChannelUnits, entry_cost: torch.Tensor):
        self.units = units
        self.cost = entry_cost.double()
        self.owner = units.unit_of_entries()

    def exact(self, keep: torch.Tensor) -> tuple[float, float]:
        """(kept MACs, kept parameters) when ``keep`` (m,) bool are kept."""
        alive = self.units.alive_entries(keep)
        return float(self.cost[alive].sum()), float(alive.sum())

    def marginal(self, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(m,) MACs and parameters that each unit's presence decides given the others:
        what removing a kept unit saves, or what adding a removed unit brings back."""
        u = self.units
        lost = (~keep).to(torch.int64)
        dead = torch.zeros(u.space.size, dtype=torch.int64)
        dead.index_add_(0, u.entries, lost[self.owner])
        others_alive = (dead[u.entries] - lost[self.owner]) == 0
        c = torch.zeros(u.m, dtype=torch.float64)
        s = torch.zeros(u.m, dtype=torch.float64)
        c.index_add_(0, self.owner, self.cost[u.entries] * others_alive)
        s.index_add_(0, self.owner, others_alive.double())
        return c, s

    def fits(self, keep: torch.Tensor, budget: UnitBudget) -> bool:
        cost, size = self.exact(keep)
        return ((budget.cost is None or cost <= budget.cost * (1 + 1e-12))
                and (budget.size is None or size <= budget.size))


def _forced(scores: torch.Tensor, units: ChannelUnits, floors: torch.Tensor,
            allowed: torch.Tensor) -> torch.Tensor:
    """(m,) bool: the ``floors[g]`` best allowed units of every group g by ``scores``."""
    keep = torch.zeros(units.m, dtype=torch.bool)
    for g in range(len(floors)):
        k = int(floors[g])
        idx = ((units.group == g) & allowed).nonzero().reshape(-1)
        if k > 0 and len(idx):
            keep[idx[torch.topk(scores[idx], min(k, len(idx))).indices]] = True
    return keep


def _repair(scores: torch.Tensor, costs: UnitCosts, budget: UnitBudget, keep: torch.Tensor,
            forced: torch.Tensor) -> torch.Tensor:
    """Drop kept units, least score per MAC and parameter saved first, until the exact
    totals fit."""
    keep = keep.clone()
    while not costs.fits(keep, budget):
        c, s = costs.marginal(keep)
        need = 0.0 * c
        if budget.cost is not None:
            need = need + c / max(budget.cost, 1e-300)
        if budget.size is not None:
            need = need + s / max(budget.size, 1e-300)
        cand = (keep & ~forced).nonzero().reshape(-1)
        if len(cand) == 0:
            break  # only the floors are left; checked against the budgets beforehand
        worst = cand[torch.argmin(scores[cand].double() / (need[cand] + 1e-300))]
        keep[worst] = False
    return keep


def _fill(scores: torch.Tensor, costs: UnitCosts, budget: UnitBudget, keep: torch.Tensor,
          allowed: torch.Tensor) -> torch.Tensor:
    """Add back removed units, best score per MAC and parameter first, while the exact
    totals still fit (each test updates the entries' dead counts incrementally)."""
    keep = keep.clone()
    u = costs.units
    c, s = costs.marginal(keep)
    weight = torch.zeros_like(c)
    if budget.cost is not None:
        weight = weight + c / max(budget.cost, 1e-300)
    if budget.size is not None:
        weight = weight + s / max(budget.size, 1e-300)
    dead = torch.zeros(u.space.size, dtype=torch.int64)
    dead.index_add_(0, u.entries, (~keep).to(torch.int64)[costs.owner])
    cost, size = costs.exact(keep)
    cand = (allowed & ~keep).nonzero().reshape(-1)
    for k in cand[torch.argsort(scores[cand].double() / (weight[cand] + 1e-300),
                                descending=True)].tolist():
        e = u.entries[u.ptr[k]:u.ptr[k + 1]]
        back = e[dead[e] == 1]  # entries whose last dead owner is this unit
        dc, ds = float(costs.cost[back].sum()), float(len(back))
        if (budget.cost is None or cost + dc <= budget.cost * (1 + 1e-12)) and (
                budget.size is None or size + ds <= budget.size):
            keep[k] = True
            dead[e] -= 1
            cost, size = cost + dc, size + ds
    return keep


def select_units(scores: torch.Tensor, costs: UnitCosts, budget: UnitBudget,
                 allowed: torch.Tensor, rounds: int = 4) -> tuple[torch.Tensor, float]:
    """The units to keep among ``allowed`` (m,) bool, maximising Σ scores (m,) >= 0 under
    ``budget``: the knapsack on costs linearised at the current choice (re-linearised up
    to ``rounds`` times), then an exact repair and fill. Returns (keep (m,) bool, the last
    knapsack's gap)."""
    units = costs.units
    forced = _forced(scores, units, budget.floors, allowed)
    keep, gap = allowed.clone(), 0.0
    for _ in range(rounds):
        c, s = costs.marginal(keep)
        kept_c, kept_s = costs.exact(keep)
        free = allowed & ~forced
        base_c = kept_c - float(c[keep & free].sum())
        base_s = kept_s - float(s[keep & free].sum())
        F = None if budget.cost is None else max(0.0, budget.cost - base_c)
        S = None if budget.size is None else max(0.0, budget.size - base_s)
        idx = free.nonzero().reshape(-1)
        r = solve_knapsack(scores[idx], c[idx], s[idx], F, S)
        new = forced.clone()
        new[idx[r.mask]] = True
        gap = r.gap
        if torch.equal(new, keep):
            break
        keep = new
    keep = _repair(scores, costs, budget, keep, forced)
    return _fill(scores, costs, budget, keep, allowed), gap


def select_prefix_units(scores: torch.Tensor, costs: UnitCosts, budget: UnitBudget,
                        allowed: torch.Tensor) -> torch.Tensor:
    """Group magnitude's rule: the floors, then the units by decreasing score while the
    exact totals fit (the longest fitting prefix, skipping none)."""
    forced = _forced(scores, costs.units, budget.floors, allowed)
    cand = (allowed & ~forced).nonzero().reshape(-1)
    order = cand[torch.argsort(scores[cand], descending=True, stable=True)]

    def prefix(k: int) -> torch.Tensor:
        keep = forced.clone()
        keep[order[:k]] = True
        return keep

    lo, hi = 0, len(order)  # prefix(lo) fits; kept totals only grow with k: bisect
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if costs.fits(prefix(mid), budget):
            lo = mid
        else:
            hi = mid - 1
    return prefix(lo)


# -- a structured step -----------------------------------------------------------------------
@dataclass
class UnitProblem:
    """One structured step: the ``units`` and their ``costs``, the ``budget``, the units
    still ``allowed`` (alive), and each unit's surviving weights as positions in the
    solver's weight vector (CSR ``ptr``/``cols``); ``position`` (p,) maps the cost model's
    flat weights to those positions (-1 outside)."""

    units: ChannelUnits
    costs: UnitCosts
    budget: UnitBudget
    allowed: torch.Tensor
    ptr: torch.Tensor
    cols: torch.Tensor
    position: torch.Tensor
    unit_macs: torch.Tensor
    round_to: int | None = None
    latency: LatencyTable | None = None

    def select(self, scores: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The knapsack choice of units for ``scores`` (in blocks with ``round_to``); with
        a latency table, the greedy choice under the measured latency
        (:func:`select_latency`)."""
        if self.latency is not None:
            return select_latency(scores, self.costs, self.budget, self.allowed,
                                  self.round_to or 1, self.latency), 0.0
        if self.round_to and self.round_to > 1:
            return select_blocks(scores, self.costs, self.budget, self.allowed, self.round_to)
        return select_units(scores, self.costs, self.budget, self.allowed)

    @classmethod
    def build(cls, units: ChannelUnits, costs: UnitCosts, budget: UnitBudget,
              allowed_units: torch.Tensor, allowed_weights: torch.Tensor,
              round_to: int | None = None, latency: LatencyTable | None = None
              ) -> UnitProblem:
        flat = units.space.flat[units.entries]
        position = torch.full((len(allowed_weights),), -1, dtype=torch.int64)
        position[allowed_weights] = torch.arange(int(allowed_weights.sum()))
        owner = units.unit_of_entries()
        ok = flat >= 0
        pos = torch.full_like(flat, -1)
        pos[ok] = position[flat[ok]]
        ok &= pos >= 0
        counts = torch.bincount(owner[ok], minlength=units.m)
        ptr = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(counts, 0)])
        macs, _ = costs.marginal(allowed_units)
        return cls(units, costs, budget, allowed_units, ptr, pos[ok], position, macs, round_to,
                   latency)

    def owner(self) -> torch.Tensor:
        return torch.repeat_interleave(torch.arange(self.units.m), torch.diff(self.ptr))

    def sums(self, values: torch.Tensor) -> torch.Tensor:
        """(m,) per-unit sums of ``values`` (p_sub,) over each unit's weights."""
        out = torch.zeros(self.units.m, dtype=torch.float64)
        out.index_add_(0, self.owner(), values.double().cpu()[self.cols])
        return out

    def support(self, keep: torch.Tensor) -> torch.Tensor:
        """The solver-space support (p_sub,) bool of the unit choice ``keep``."""
        full = self.units.weight_mask(keep)
        sub = torch.zeros(int((self.position >= 0).sum()), dtype=torch.bool)
        inside = self.position >= 0
        sub[self.position[inside]] = full[: len(self.position)][inside]
        return sub

    def weighted(self, scores: torch.Tensor, beta: float) -> torch.Tensor:
        """Scores times each unit's MACs (what removing it saves now) to the power
        ``beta``: the knapsack's value per MAC is then score x MACs^(beta - 1), from
        FLOP-aware (beta = 0) to plain score order (beta = 1)."""
        return scores * self.unit_macs.clamp_min(1e-12) ** beta if beta else scores

    def normalized(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores divided by their group's mean over the allowed units (a group's layers
        may have any scale when normalisation layers follow them)."""
        out = torch.zeros_like(scores)
        for g in torch.unique(self.units.group[self.allowed]).tolist():
            idx = (self.units.group == g) & self.allowed
            out[idx] = scores[idx] / scores[idx].mean().clamp_min(1e-300)
        return out


def group_obs(qm: QuadraticModel, up: UnitProblem, rank: int | None) -> torch.Tensor:
    """(m,) float64: the increase of Q when a unit's weights G are removed and every other
    weight compensates, (1/2) w_Gᵀ [(H⁻¹)_GG]⁻¹ w_G with H = XᵀX/n + λI, computed through
    the eigenvectors of the n x n Gram matrix XXᵀ (Woodbury): with X_r the ``rank``
    leading rotated rows (all n when None) and Z = (Λ + nλ)^(-1/2) X_r,
    λ (H⁻¹)_GG = I - Z_GᵀZ_G, solved in the smaller of the |G| x |G| and r x r forms."""
    n, lam = qm.n, qm.lam
    K = qm.support_gram(torch.ones(qm.p, dtype=torch.bool, device=qm.device))
    evals, evecs = torch.linalg.eigh(K)
    r = n if rank is None else min(rank, n)
    evals, evecs = evals[-r:].clamp_min(0), evecs[:, -r:]
    scale = (evals + n * lam).rsqrt()
    Z = torch.empty((r, qm.p), dtype=torch.float32, device=qm.device)
    Q = (evecs * scale).to(qm.dtype)
    qm.X.column_map(lambda Xc, a, b: (Q.T @ Xc).float(), Z)
    floor = lam / (lam + float(evals.max()) / n + 1e-300)  # eigenvalues of λ(H⁻¹)_GG
    w = qm.w_bar.double()
    out = torch.zeros(up.units.m, dtype=torch.float64)
    for u in range(up.units.m):
        cols = up.cols[up.ptr[u]:up.ptr[u + 1]].to(qm.device)
        if len(cols):
            out[u] = 0.5 * lam * _quad_form(Z[:, cols].double(), w[cols], floor)
    return out


def group_fisher(qm: QuadraticModel, up: UnitProblem) -> torch.Tensor:
    """(m,) float64: the Fisher part of Q when a unit's weights G are removed and nothing
    compensates, (1/2n) Σ_j (x_jGᵀ w_G)²: a second-order loss estimate that does not
    depend on the scale of layers followed by normalisation."""
    owner = up.owner()
    order = torch.argsort(up.cols)
    cols, owner = up.cols[order], owner[order]
    S = torch.zeros((qm.n, up.units.m), dtype=torch.float64, device=qm.device)
    w = qm.w_bar
    bounds = torch.searchsorted(cols, torch.tensor([a for a, _ in qm.X.ranges()] + [qm.p]))
    for k, (a, b) in enumerate(qm.X.ranges()):
        lo, hi = int(bounds[k]), int(bounds[k + 1])
        if hi > lo:
            part = qm.X.columns(a, b) * w[a:b]
            c = cols[lo:hi].to(qm.device) - a
            S.index_add_(1, owner[lo:hi].to(qm.device), part[:, c].double())
    return 0.5 * S.square().mean(0).cpu()


def _quad_form(Zg: torch.Tensor, wg: torch.Tensor, floor: float) -> float:
    """w_Gᵀ (I - Z_GᵀZ_G)⁻¹ w_G with Z_G (r, k), eigenvalues floored at ``floor``."""
    r, k = Zg.shape
    if k <= r:
        A = torch.eye(k, dtype=Zg.dtype, device=Zg.device) - Zg.T @ Zg
        e, V = torch.linalg.eigh(A)
        proj = V.T @ wg
        return float((proj.square() / e.clamp_min(floor)).sum())
    y = Zg @ wg  # Woodbury: |w|² + yᵀ (I - Z Zᵀ)⁻¹ y
    B = torch.eye(r, dtype=Zg.dtype, device=Zg.device) - Zg @ Zg.T
    e, V = torch.linalg.eigh(B)
    proj = V.T @ y
    return float(wg.square().sum() + (proj.square() / e.clamp_min(floor)).sum())


UnitEvaluate = Callable[[torch.Tensor, torch.Tensor], float]


@dataclass
class UnitResult:
    """A structured step's outcome: the solver result (weights and support in the solver's
    space) and the units kept (m,) bool."""

    result: SolverResult
    keep: torch.Tensor


def group_norms(w_bar: torch.Tensor, up: UnitProblem) -> torch.Tensor:
    """Each unit's L2 norm divided by its group's mean (Torch-Pruning's default group
    magnitude): comparable across layers whose scale a normalisation layer undoes."""
    return up.normalized(up.sums(w_bar ** 2).sqrt())


def group_magnitude(w_bar: torch.Tensor, up: UnitProblem, flop_aware: bool) -> UnitResult:
    """``mp`` (the longest prefix by normalised group norm) or ``mp_flops`` (the
    knapsack on it, value per MAC)."""
    scores = group_norms(w_bar, up)
    if flop_aware:
        keep, gap = up.select(scores)
    elif up.round_to and up.round_to > 1:
        keep, gap = select_blocks(scores * up.unit_macs, up.costs, up.budget, up.allowed,
                                  up.round_to)
    else:
        keep, gap = select_prefix_units(scores, up.costs, up.budget, up.allowed), None
    mask = up.support(keep).to(w_bar.device)
    return UnitResult(SolverResult(w_bar * mask, mask, gap), keep)


@dataclass
class _UnitSearch:
    qm: QuadraticModel
    up: UnitProblem
    trace: SolverTrace
    evaluate: UnitEvaluate | None

    def candidate(self, keep: torch.Tensor, lam: float | None, key: tuple[str, float], gap
                  ) -> tuple[float, UnitResult]:
        """The unit choice ``keep`` with its surviving weights as they are (``lam`` None)
        or back-solved on Q with ridge ``lam``, scored on held-out samples."""
        mask = self.up.support(keep).to(self.qm.device)
        q = self.qm if lam is None else self.qm.with_ridge(lam)
        with timed(self.trace, "backsolve"):
            if lam is None:
                w = self.qm.w_bar * mask
                obj = q.value(w)
            else:
                w, obj = q.solve_with_value(mask)
        with timed(self.trace, "held_out"):
            s = self.evaluate(w, keep) if self.evaluate is not None else obj
        self.trace.history.append({"phase": "warm start", "saliency": key[0], "beta": key[1],
                                   "ridge": lam, "objective": obj, "score": s,
                                   "units_kept": int(keep.sum())})
        res = SolverResult(w, mask, gap, None, 0, obj, lam, key[1], saliency=key[0],
                           score=s if self.evaluate is not None else None)
        return s, UnitResult(res, keep)


def unit_saliencies(qm: QuadraticModel, up: UnitProblem, names: tuple[str, ...],
                    rank: int | None) -> dict[str, torch.Tensor]:
    """(m,) scores of each unit: 'magnitude' (normalised group norm), 'obs' (group OBS)
    and 'fisher' (group Fisher, no compensation)."""
    out = {}
    if "magnitude" in names:
        out["magnitude"] = group_norms(qm.w_bar, up)
    if "obs" in names:
        out["obs"] = group_obs(qm, up, rank)
    if "fisher" in names:
        out["fisher"] = group_fisher(qm, up)
    return out


def group_falcon(qm: QuadraticModel, up: UnitProblem, opts: SolverOptions,
                 trace: SolverTrace, evaluate: UnitEvaluate | None = None,
                 rank: int | None = 256) -> UnitResult:
    """FALCON on units: warm starts from the knapsack on each saliency of
    ``opts.saliencies`` weighted by the units' MACs to the power β; each choice is scored
    on held-out samples (``evaluate(w, keep)``) with its surviving weights as they are and
    back-solved on Q; the best, then the best ridge; then ``opts.max_iter`` iterations of
    hard thresholding whose projection is the knapsack over units, kept when it scores
    better. Without held-out samples β = ``opts.cost_exponent`` and Q decides."""
    search = _UnitSearch(qm, up, trace, evaluate)
    betas = opts.cost_exponents if evaluate is not None else (opts.cost_exponent,)
    with timed(trace, "saliency"):
        sal = unit_saliencies(qm, up, opts.saliencies, rank)
    best_s, best = math.inf, None
    for key in [(k, b) for k in opts.saliencies for b in betas]:
        with timed(trace, "projection"):
            keep, gap = up.select(up.weighted(sal[key[0]], key[1]))
        for lam in (None, qm.lam):
            s, res = search.candidate(keep, lam, key, gap)
            if s < best_s:
                best_s, best = s, res
    r0 = best.result
    for lam in opts.ridges if evaluate is not None and r0.ridge is not None else ():
        if lam != qm.lam:
            s, res = search.candidate(best.keep, lam, (r0.saliency, r0.beta), r0.ilp_gap)
            if s < best_s:
                best_s, best = s, res
    best.result.source = "warm start"
    if opts.max_iter == 0:
        return best
    return _unit_iht(search, best, best_s, opts)


def _unit_iht(search: _UnitSearch, best: UnitResult, best_s: float, opts: SolverOptions
              ) -> UnitResult:
    """Hard thresholding from the best warm start, projecting onto unit choices."""
    up, r0 = search.up, best.result
    last = {"keep": best.keep}

    def project(v: torch.Tensor):
        keep, gap = up.select(up.weighted(up.sums(v ** 2), r0.beta))
        last["keep"] = keep
        return up.support(keep).to(v.device), None

    q = search.qm.with_ridge(r0.ridge or search.qm.lam)
    refined = refine(q, q.w_bar * r0.mask, project, opts, search.trace, "falcon units")
    keep = last["keep"]
    with timed(search.trace, "held_out"):
        s = search.evaluate(refined.w, keep) if search.evaluate else refined.objective
    if s >= best_s:
        return best
    refined.ridge, refined.beta, refined.saliency = r0.ridge, r0.beta, r0.saliency
    refined.score, refined.source = (s if search.evaluate else None), "iht"
    return UnitResult(refined, keep)


# -- channel counts in multiples of k -------------------------------------------------------
def _blocks(scores: torch.Tensor, units: ChannelUnits, allowed: torch.Tensor, k: int
            ) -> list[list[torch.Tensor]]:
    """Per group, its allowed units by decreasing score cut into blocks of ``k`` (the last
    block holds the rest): keeping a prefix of blocks keeps a multiple of ``k`` channels,
    or all of them. A group of attention heads is cut into single heads."""
    out = []
    for g in range(len(units.groups)):
        idx = ((units.group == g) & allowed).nonzero().reshape(-1)
        idx = idx[torch.argsort(scores[idx], descending=True, stable=True)]
        out.append(list(torch.split(idx, units.block(g, k))) if len(idx) else [])
    return out


def _least_blocks(blocks, units: ChannelUnits, floors: torch.Tensor, k: int) -> list[int]:
    """Per group, the fewest blocks that keep its floor of units (a block is ``k`` units,
    or one head in a group of heads)."""
    return [min(len(bl), -(-int(f) // units.block(g, k)))
            for g, (bl, f) in enumerate(zip(blocks, floors.tolist(), strict=True))]


def _keep_of(blocks: list[list[torch.Tensor]], counts: list[int], m: int) -> torch.Tensor:
    keep = torch.zeros(m, dtype=torch.bool)
    for bl, n in zip(blocks, counts, strict=True):
        for b in bl[:n]:
            keep[b] = True
    return keep


def select_blocks(scores: torch.Tensor, costs: UnitCosts, budget: UnitBudget,
                  allowed: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """:func:`select_units` with every group keeping a multiple of ``k`` channels (or all
    of them): the knapsack chooses blocks of ``k`` units (each group's best first), then
    the counts are repaired and filled a block at a time against exact totals."""
    units = costs.units
    blocks = _blocks(scores, units, allowed, k)
    least = _least_blocks(blocks, units, budget.floors, k)
    c, s = costs.marginal(allowed)
    items = [(g, j) for g, bl in enumerate(blocks) for j in range(least[g], len(bl))]
    base = _keep_of(blocks, least, units.m)
    kept_c, kept_s = costs.exact(base)
    val = torch.tensor([float(scores[blocks[g][j]].sum()) for g, j in items] or [0.0])
    cc = torch.tensor([float(c[blocks[g][j]].sum()) for g, j in items] or [0.0])
    ss = torch.tensor([float(s[blocks[g][j]].sum()) for g, j in items] or [0.0])
    F = None if budget.cost is None else max(0.0, budget.cost - kept_c)
    S = None if budget.size is None else max(0.0, budget.size - kept_s)
    r = solve_knapsack(val, cc, ss, F, S) if items else None
    counts = list(least)
    for (g, _), take in zip(items, r.mask.tolist() if r else [], strict=False):
        counts[g] += int(take)
    counts = _repair_blocks(blocks, counts, least, scores, costs, budget)
    return _fill_blocks(blocks, counts, scores, lambda n: costs.fits(
        _keep_of(blocks, n, units.m), budget)), (r.gap if r else 0.0)


def _block_value(blocks, g: int, j: int, scores: torch.Tensor) -> float:
    return float(scores[blocks[g][j]].sum())


def _repair_blocks(blocks, counts, least, scores, costs: UnitCosts, budget: UnitBudget
                   ) -> list[int]:
    """Drop each group's last block, the least valuable per MAC first, until it fits."""
    counts = list(counts)
    while not costs.fits(_keep_of(blocks, counts, costs.units.m), budget):
        c, _ = costs.marginal(_keep_of(blocks, counts, costs.units.m))
        cand = [g for g in range(len(blocks)) if counts[g] > least[g]]
        if not cand:
            break
        g = min(cand, key=lambda g: _block_value(blocks, g, counts[g] - 1, scores)
                / (float(c[blocks[g][counts[g] - 1]].sum()) + 1e-300))
        counts[g] -= 1
    return counts


def _fill_blocks(blocks, counts, scores, fits: Callable[[list[int]], bool]) -> torch.Tensor:
    """Add each group's next block, the most valuable first, while ``fits(counts)``; the
    choice as (m,) bool."""
    counts = list(counts)
    progress = True
    while progress:
        progress = False
        cand = sorted((g for g in range(len(blocks)) if counts[g] < len(blocks[g])),
                      key=lambda g: -_block_value(blocks, g, counts[g], scores))
        for g in cand:
            counts[g] += 1
            if fits(counts):
                progress = True
                break
            counts[g] -= 1
    return _keep_of(blocks, counts, len(scores))


# -- a measured latency budget --------------------------------------------------------------
def _dead(blocks, counts: list[int], sizes: list[int]) -> list[int]:
    """Units removed per group when group g keeps the first ``counts[g]`` of its blocks
    (``sizes[g]``: all of its units)."""
    return [n - sum(len(b) for b in bl[:c]) for bl, c, n in zip(blocks, counts, sizes,
                                                                 strict=True)]


def _over(costs: UnitCosts, budget: UnitBudget, table: LatencyTable, keep: torch.Tensor,
          dead: list[int]) -> tuple[float, float, float]:
    """How far the choice is over each budget, relative to it (0 where it fits):
    (MACs, parameters, seconds)."""
    cost, size = costs.exact(keep)
    secs = table.seconds(dead)

    def rel(v, b):
        return 0.0 if b is None or v <= b * (1 + 1e-12) else (v - b) / max(b, 1e-300)
    return rel(cost, budget.cost), rel(size, budget.size), rel(secs, budget.latency)


#: the most blocks one greedy cut removes from a group (enough to cross a kernel's step of
#: 16 channels in blocks of 4)
CUT_BLOCKS = 4


def _cheapest_cut(blocks, counts, least, sizes, scores, c, s, budget: UnitBudget,
                  table: LatencyTable, over: tuple[float, float, float],
                  lengths: Callable[[int, bool], bool]) -> list[int] | None:
    """The counts after removing, from one group, the last j blocks (the lengths that
    ``lengths(j, to_floor)`` allows) that lose the least score per budget saved: MACs and
    parameters from the linearised costs ``c``, ``s`` (m,), seconds from the table; only
    budgets that are exceeded count."""
    now = table.seconds(_dead(blocks, counts, sizes))
    best, best_ratio = None, math.inf
    for g, bl in enumerate(blocks):
        lost = torch.zeros(0, dtype=torch.int64)
        for j in range(counts[g] - 1, least[g] - 1, -1):
            lost = torch.cat([lost, bl[j]])
            if not lengths(counts[g] - j, j == least[g]):
                continue
            new = list(counts)
            new[g] = j
            gain = 0.0
            if over[0] > 0:
                gain += float(c[lost].sum()) / budget.cost
            if over[1] > 0:
                gain += float(s[lost].sum()) / budget.size
            if over[2] > 0:
                gain += max(0.0, now - table.seconds(_dead(blocks, new, sizes))) / budget.latency
            ratio = float(scores[lost].sum()) / gain if gain > 0 else math.inf
            if ratio < best_ratio:
                best, best_ratio = new, ratio
    return best


def select_latency(scores: torch.Tensor, costs: UnitCosts, budget: UnitBudget,
                   allowed: torch.Tensor, k: int, table: LatencyTable) -> torch.Tensor:
    """The units to keep among ``allowed`` (m,) bool under ``budget`` with its seconds
    predicted by the measured ``table``: every group keeps a prefix of its units by
    decreasing ``scores`` in blocks of ``k``. Greedy: from all allowed units, cut the
    blocks that lose the least score per budget saved (several at once, so that a cut can
    cross a step of a kernel's speed) until every budget fits, then add back blocks, best
    score first, while they fit."""
    units = costs.units
    blocks = _blocks(scores, units, allowed, k)
    sizes = torch.bincount(units.group, minlength=len(blocks)).tolist()
    least = _least_blocks(blocks, units, budget.floors, k)
    c, s = costs.marginal(allowed)
    counts = [len(bl) for bl in blocks]
    while True:
        keep = _keep_of(blocks, counts, units.m)
        over = _over(costs, budget, table, keep, _dead(blocks, counts, sizes))
        if not any(over):
            break
        cut = _cheapest_cut(blocks, counts, least, sizes, scores, c, s, budget, table, over,
                            lambda j, to_floor: j <= CUT_BLOCKS)
        if cut is None:  # no short cut saves time (steps, or timing noise): longer ones,
            # 8, 16, 32, ... blocks or down to the floor (a few new timings per group)
            cut = _cheapest_cut(blocks, counts, least, sizes, scores, c, s, budget, table,
                                over, lambda j, to_floor: to_floor or (
                                    j > CUT_BLOCKS and j & (j - 1) == 0))
        if cut is None:  # nothing saves: the floors, which fit (checked beforehand)
            cut = list(least)
        if cut == counts:
            break
        counts = cut
    return _fill_blocks(blocks, counts, scores, lambda n: not any(_over(
        costs, budget, table, _keep_of(blocks, n, units.m), _dead(blocks, n, sizes))))
