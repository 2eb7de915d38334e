"""Choosing channel units under the budgets (structure='channels').

A unit (:mod:`falcon_prune.analysis.structure`) removes a set of weights at once, and
costs couple units: a weight dies with either of its two units (its output and its input
channel). A choice is therefore made on costs linearised at the current choice (the
two-budget knapsack of :mod:`falcon_prune.selection.knapsack`), re-linearised a few times,
then repaired and filled with exact recounts, so that the chosen units never exceed a
budget. Variants keep every group's count a multiple of ``round_to`` (blocks), keep the
longest prefix of an order (group magnitude's rule), or meet a measured latency budget
with a lookup table of layer times (:mod:`falcon_prune.analysis.timing`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from falcon_prune.analysis.structure import ChannelUnits
from falcon_prune.analysis.timing import LatencyTable
from falcon_prune.selection.knapsack import solve_knapsack


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
