"""Per-weight costs grouped by value: what the ILP and the selections read.

A network's weights have few distinct costs (one per layer), so the ILP works on groups of
weights that share a cost (:class:`CostGroups`); a group may be a list of index tensors or,
for the layers of a network, spans of the flat vector (:class:`SpanGroups`, no index
tensors at all). Arbitrary per-weight costs use a flat representation.
"""

from __future__ import annotations

import torch

from falcon_prune.errors import ConfigError

#: above this many distinct costs, the flat (top-k) representation is used
MAX_GROUPS = 512


class CostGroups:
    """The weights sharing each distinct cost, as index tensors; built once, reused for
    every solve. Use :meth:`from_costs` for (p,) per-weight costs, or :meth:`from_layers`
    for the per-layer structure of a network, which gives :class:`SpanGroups` (contiguous
    spans, no (p,) index or cost vector at all).

    Every access to a group's entries of a (p,) vector goes through :meth:`segments` (the
    entries in position order), :meth:`gather` (them as one copy), :meth:`put` (write them)
    and :meth:`scale_`, so the solvers never depend on the representation.
    """

    def __init__(self, index: list[torch.Tensor], cost: torch.Tensor, p: int):
        self.index = index  # G tensors of int64 indices into the flat vector
        self.cost = cost.to(torch.float64)  # (G,)
        self.p = p

    def __len__(self) -> int:
        return len(self.cost)

    @classmethod
    def from_costs(cls, costs: torch.Tensor) -> CostGroups:
        costs = torch.as_tensor(costs).reshape(-1)
        if costs.numel() == 0:
            raise ConfigError("costs is empty: there is nothing to select")
        if not torch.isfinite(costs).all() or (costs < 0).any():
            raise ConfigError("costs must be finite and >= 0")
        values, inverse = torch.unique(costs.to(torch.float64), return_inverse=True)
        if values.numel() > MAX_GROUPS:
            return FlatCosts(costs.to(torch.float64))
        order = torch.argsort(inverse, stable=True)
        counts = torch.bincount(inverse, minlength=values.numel()).tolist()
        return cls(list(torch.split(order, counts)), values, costs.numel())

    @classmethod
    def from_layers(
        cls,
        layer_costs: torch.Tensor,
        layer_sizes: torch.Tensor,
        device: torch.device | None = None,
    ) -> SpanGroups:
        """Groups from per-layer costs (L,) and sizes (L,) of a flat, layer-by-layer vector:
        one group per distinct cost, each a list of the layers' spans."""
        offsets = [0, *torch.cumsum(torch.as_tensor(layer_sizes), 0).tolist()]
        by_cost: dict[float, list[tuple[int, int]]] = {}
        for c, a, b in zip(torch.as_tensor(layer_costs).tolist(), offsets[:-1], offsets[1:],
                           strict=True):
            by_cost.setdefault(float(c), []).append((int(a), int(b)))
        keys = sorted(by_cost)
        return SpanGroups([by_cost[k] for k in keys],
                          torch.tensor(keys, dtype=torch.float64, device=device), offsets[-1])

    def size(self, g: int) -> int:
        """Number of weights in group ``g``."""
        return int(self.index[g].numel())

    def segments(self, v: torch.Tensor, g: int) -> list[torch.Tensor]:
        """Group ``g``'s entries of ``v`` (p,), in position order: 1-D pieces (views where
        the representation allows, so do not write into them)."""
        return [v[self.index[g].to(v.device)]]

    def gather(self, v: torch.Tensor, g: int) -> torch.Tensor:
        """Group ``g``'s entries of ``v`` (p,) as one new tensor (a copy)."""
        return self.segments(v, g)[0]  # indexing already made a copy

    def put(self, out: torch.Tensor, g: int, pieces: list[torch.Tensor] | float) -> None:
        """Write group ``g``'s entries of ``out`` (p,): ``pieces`` as returned by
        :meth:`segments` (same lengths), or one value for all of them."""
        idx = self.index[g].to(out.device)
        out[idx] = pieces if isinstance(pieces, float) else pieces[0]

    def scale_(self, v: torch.Tensor, factors: list[float]) -> torch.Tensor:
        """Multiply group g's entries of ``v`` (p,) by ``factors[g]`` in place; returns v."""
        for g, f in enumerate(factors):
            if f != 1.0:
                idx = self.index[g].to(v.device)
                v[idx] *= f
        return v

    @property
    def total_cost(self) -> float:
        return float(sum(c * self.size(g) for g, c in enumerate(self.cost.tolist())))

    def subset(self, keep: torch.Tensor) -> CostGroups:
        """The groups of the sub-vector ``v[keep]`` (keep: (p,) bool): indices renumbered to
        positions among the kept weights, empty groups dropped."""
        keep = keep.reshape(-1).to(torch.bool)
        position = torch.cumsum(keep.to(torch.int64), 0) - 1
        index, cost = [], []
        for c, idx in zip(self.cost.tolist(), self.index, strict=True):
            k = keep.to(idx.device)[idx]
            if bool(k.any()):
                index.append(position.to(idx.device)[idx[k]])
                cost.append(c)
        return CostGroups(index, torch.tensor(cost, dtype=torch.float64), int(keep.sum()))


class SpanGroups(CostGroups):
    """Groups whose members are contiguous spans ``[a, b)`` of the flat vector (a network's
    layers): no index tensors, and a group's entries of a vector are views."""

    def __init__(self, spans: list[list[tuple[int, int]]], cost: torch.Tensor, p: int):
        self.spans = spans  # per group, its (a, b) spans in increasing order
        self.cost = cost.to(torch.float64)
        self.p = p

    @property
    def index(self) -> list[torch.Tensor]:
        """Index tensors (int64) of the groups, built on demand (for inspection)."""
        return [torch.cat([torch.arange(a, b) for a, b in sp]) if sp else
                torch.empty(0, dtype=torch.int64) for sp in self.spans]

    def size(self, g: int) -> int:
        return sum(b - a for a, b in self.spans[g])

    def segments(self, v: torch.Tensor, g: int) -> list[torch.Tensor]:
        return [v[a:b] for a, b in self.spans[g]]

    def gather(self, v: torch.Tensor, g: int) -> torch.Tensor:
        return torch.cat(self.segments(v, g))

    def put(self, out: torch.Tensor, g: int, pieces: list[torch.Tensor] | float) -> None:
        for j, (a, b) in enumerate(self.spans[g]):
            out[a:b] = pieces if isinstance(pieces, float) else pieces[j]

    def scale_(self, v: torch.Tensor, factors: list[float]) -> torch.Tensor:
        for sp, f in zip(self.spans, factors, strict=True):
            if f != 1.0:
                for a, b in sp:
                    v[a:b].mul_(f)
        return v

    def subset(self, keep: torch.Tensor) -> SpanGroups:
        """The groups of ``v[keep]``: the kept part of a span is a span of the sub-vector,
        so only one count per span is needed (no (p,) temporaries)."""
        keep = keep.reshape(-1).to(torch.bool)
        flat = sorted((a, b, g) for g, sp in enumerate(self.spans) for a, b in sp)
        spans: list[list[tuple[int, int]]] = [[] for _ in self.spans]
        pos, last = 0, 0
        for a, b, g in flat:
            pos += int(keep[last:a].sum())  # kept entries between spans (none for layers)
            k = int(keep[a:b].sum())
            if k:
                spans[g].append((pos, pos + k))
            pos, last = pos + k, b
        pos += int(keep[last:].sum())
        live = [g for g, sp in enumerate(spans) if sp]
        return SpanGroups([spans[g] for g in live], self.cost[live], pos)


class FlatCosts(CostGroups):
    """Arbitrary per-weight costs with too many distinct values to group."""

    def __init__(self, costs: torch.Tensor):
        self.costs = costs
        self.p = costs.numel()
        self.index = []
        self.cost = torch.empty(0, dtype=torch.float64)

    @property
    def total_cost(self) -> float:
        return float(self.costs.sum())

    def subset(self, keep: torch.Tensor) -> CostGroups:
        return FlatCosts(self.costs[keep.reshape(-1).to(torch.bool).to(self.costs.device)])
