"""The space of channel units (structure='channels'): a physically smaller network.

Items are the units of :mod:`falcon_prune.analysis.structure` (a channel of a coupled
group, or an attention head). While stages run the working copy keeps its full size: a
removed unit's weights are zero, and so are its biases and normalisation parameters, so
the network computes exactly what the smaller one will. At the end Torch-Pruning's surgery
removes the dead channels, and the smaller network is checked against the budgets by the
independent recount and a parameter count.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from falcon_prune.analysis.costs import CostModel
from falcon_prune.analysis.masks import write_weights
from falcon_prune.analysis.recount import MacCount
from falcon_prune.analysis.structure import ChannelUnits, channel_units, remove_channels
from falcon_prune.analysis.timing import LatencyTable
from falcon_prune.errors import BudgetError, BudgetViolation, ModelError
from falcon_prune.loss.distributed import Ranks
from falcon_prune.loss.planning import HALF
from falcon_prune.loss.quadratic import QuadraticModel
from falcon_prune.loss.saliency import group_fisher, group_obs
from falcon_prune.methods.options import SolverResult
from falcon_prune.selection.units import (
    UnitBudget,
    UnitCosts,
    select_blocks,
    select_latency,
    select_prefix_units,
    select_units,
)
from falcon_prune.spaces.base import (
    Choices,
    Evaluate,
    Outcome,
    Selection,
    Space,
    positions,
    scatter,
)


class UnitChoices(Choices):
    """A step over units: the variables ``w_bar`` are the weights of the alive units;
    each unit's surviving weights are positions among them (CSR ``ptr``/``cols``);
    ``unit_macs`` (m,) what removing each unit saves now; choices keep every group's
    count a multiple of ``round_to``, or meet the ``latency`` table's budget."""

    def __init__(self, w_bar: torch.Tensor, units: ChannelUnits, costs: UnitCosts,
                 budget: UnitBudget, allowed: torch.Tensor, allowed_weights: torch.Tensor,
                 round_to: int | None = None, latency: LatencyTable | None = None):
        self.w_bar, self.units, self.costs, self.budget = w_bar, units, costs, budget
        self.allowed, self.round_to, self.latency = allowed, round_to, latency
        flat = units.space.flat[units.entries]
        position = torch.full((len(allowed_weights),), -1, dtype=torch.int64)
        position[allowed_weights] = torch.arange(int(allowed_weights.sum()))
        ok = flat >= 0
        pos = torch.full_like(flat, -1)
        pos[ok] = position[flat[ok]]
        ok &= pos >= 0
        counts = torch.bincount(units.unit_of_entries()[ok], minlength=units.m)
        self.ptr = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(counts, 0)])
        self.cols, self.position = pos[ok], position
        self.unit_macs, _ = costs.marginal(allowed)

    def sums(self, values: torch.Tensor) -> torch.Tensor:
        """(m,) per-unit sums of ``values`` (p,) over each unit's weights."""
        owner = torch.repeat_interleave(torch.arange(self.units.m), torch.diff(self.ptr))
        out = torch.zeros(self.units.m, dtype=torch.float64)
        out.index_add_(0, owner, values.double().cpu()[self.cols])
        return out

    def support(self, keep: torch.Tensor) -> torch.Tensor:
        """The variables' support (p,) bool of the unit choice ``keep`` (m,) bool."""
        full = self.units.weight_mask(keep)
        inside = self.position >= 0
        sub = torch.zeros(int(inside.sum()), dtype=torch.bool)
        sub[self.position[inside]] = full[: len(self.position)][inside]
        return sub.to(self.w_bar.device)

    def normalized(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores divided by their group's mean over the allowed units (a group's layers
        may have any scale when normalisation layers follow them)."""
        out = torch.zeros_like(scores)
        for g in torch.unique(self.units.group[self.allowed]).tolist():
            idx = (self.units.group == g) & self.allowed
            out[idx] = scores[idx] / scores[idx].mean().clamp_min(1e-300)
        return out

    def magnitude(self) -> torch.Tensor:
        """Each unit's L2 norm divided by its group's mean (Torch-Pruning's default group
        magnitude): comparable across layers whose scale a normalisation layer undoes."""
        return self.normalized(self.sums(self.w_bar ** 2).sqrt())

    def scores_of(self, v: torch.Tensor) -> torch.Tensor:
        return self.sums(v ** 2)

    def weighted(self, scores: torch.Tensor, beta: float) -> torch.Tensor:
        return scores * self.unit_macs.clamp_min(1e-12) ** beta if beta else scores

    def _selection(self, keep: torch.Tensor, gap: float | None) -> Selection:
        return Selection(self.support(keep), keep, gap)

    def select(self, scores: torch.Tensor) -> Selection:
        """The knapsack choice (in blocks with ``round_to``); with a latency table, the
        greedy choice under the measured latency."""
        if self.latency is not None:
            return self._selection(select_latency(scores, self.costs, self.budget,
                                                  self.allowed, self.round_to or 1,
                                                  self.latency), 0.0)
        if self.round_to and self.round_to > 1:
            return self._selection(*select_blocks(scores, self.costs, self.budget,
                                                  self.allowed, self.round_to))
        return self._selection(*select_units(scores, self.costs, self.budget, self.allowed))

    def prefix(self, scores: torch.Tensor) -> Selection:
        """The longest fitting prefix by score; with ``round_to``, in blocks (valued by
        score x MACs, the block rule's order)."""
        if self.round_to and self.round_to > 1:
            return self._selection(*select_blocks(scores * self.unit_macs, self.costs,
                                                  self.budget, self.allowed, self.round_to))
        return self._selection(select_prefix_units(scores, self.costs, self.budget,
                                                   self.allowed), None)

    def saliencies(self, qm: QuadraticModel, names: tuple[str, ...], rank: int | None
                   ) -> dict[str, torch.Tensor]:
        """'magnitude' (normalised group norm), 'obs' (group OBS) and 'fisher' (group
        Fisher, no compensation)."""
        rules = {"magnitude": self.magnitude,
                 "obs": lambda: group_obs(qm, self.ptr, self.cols, rank),
                 "fisher": lambda: group_fisher(qm, self.ptr, self.cols)}
        return {name: rules[name]() for name in names}

    def start_ridges(self, lam: float) -> tuple[float | None, ...]:
        return (None, lam)

    def describe(self, selection: Selection) -> dict:
        return {"units_kept": int(selection.keep.sum())}


class UnitSpace(Space):
    """The channel units of a run and which are still ``alive``, with what a unit choice
    does to the parameters that are not prunable weights (biases, norms): their
    ``originals`` and ranges in the global parameter space; ``latency``, the measured
    lookup table of a ``latency=`` budget; ``shape``, the network's output shape."""

    recalibrates = True

    def __init__(self, cm: CostModel, config, units: ChannelUnits, costs: UnitCosts,
                 floors: torch.Tensor, total_params: int,
                 originals: dict[str, tuple[int, torch.Tensor]]):
        super().__init__(cm, config)
        self.units, self.costs, self.floors = units, costs, floors
        self.total_params, self.originals = total_params, originals
        self.alive = torch.ones(units.m, dtype=torch.bool)
        self.latency: LatencyTable | None = None
        self.shape: torch.Size | None = None  # the network's output shape
        self.probe: object = None  # model inputs the finished network is run on
        self.call: Callable | None = None

    @classmethod
    def build(cls, model: nn.Module, cm: CostModel, inputs: object,
              call: Callable[[nn.Module, object], object], config) -> UnitSpace:
        """The units of ``model`` (traced on ``inputs`` run by ``call``), their floors
        and the originals of their non-weight parameters."""
        units = channel_units(model, cm, inputs, call, config.keep_layers or ())
        space = units.space
        entry_cost = torch.zeros(space.size, dtype=torch.float64)
        sel = space.flat >= 0
        entry_cost[sel] = cm.per_weight_costs()[space.flat[sel]]
        sizes = torch.bincount(units.group, minlength=len(units.groups))
        least = 0 if config.allow_empty_layers else 1
        floors = torch.clamp(torch.maximum(
            torch.full_like(sizes, least), torch.ceil(config.min_density * sizes - 1e-9).long()),
            max=sizes)
        prunable = {lay.name for lay in cm.layers}
        originals = {}
        for name, p in model.named_parameters():
            a = space.start(name)
            if name not in prunable and bool((units.cover[a:a + p.numel()] > 0).any()):
                originals[name] = (a, p.detach().clone())
        out = cls(cm, config, units, UnitCosts(units, entry_cost), floors, space.size,
                  originals)
        out.probe, out.call = inputs, call
        with torch.no_grad():
            out.shape = config.task.output(call(model, inputs)).shape
        return out

    @property
    def second(self) -> str:  # type: ignore[override]
        return "nnz" if self.latency is None else "latency"

    # -- budgets ------------------------------------------------------------------------------
    def budget(self, flops: float | None, second: float | None) -> UnitBudget:
        """Kept MACs of the prunable weights, and kept parameters or (with a latency
        table) predicted seconds per forward, from kept fractions."""
        if self.latency is not None:
            return self.unit_budget(flops, None, second)
        return self.unit_budget(flops, second)

    def unit_budget(self, flops: float | None, nnz: float | None,
                    latency: float | None = None) -> UnitBudget:
        return UnitBudget(None if flops is None else flops * self.cm.dense_macs,
                          None if nnz is None else math.floor(nnz * self.total_params + 1e-9),
                          self.floors,
                          None if latency is None else latency * self.latency.total)

    def least(self) -> torch.Tensor:
        """(m,) bool: the cheapest units that keep every group's floor (in blocks of
        ``round_to``)."""
        least = torch.zeros(self.units.m, dtype=torch.bool)
        c, _ = self.costs.marginal(torch.ones(self.units.m, dtype=torch.bool))
        for g in range(len(self.floors)):  # each group's cheapest channels (or heads)
            idx = (self.units.group == g).nonzero().reshape(-1)
            kg = self.units.block(g, self.config.round_to)
            n = min(len(idx), -(-int(self.floors[g]) // kg) * kg)
            least[idx[torch.argsort(c[idx])[:n]]] = True
        return least

    def check(self, budget: UnitBudget) -> None:
        """Refuse budgets below what the layers kept whole and the least channels of every
        group (in multiples of ``round_to``) need."""
        least, k = self.least(), self.config.round_to or 1
        cost, size = self.costs.exact(least)
        why = "the layers kept whole and the least channels of every group" + (
            f" ({k} per group with round_to={k})" if k > 1 else "")
        if budget.cost is not None and cost > budget.cost * (1 + 1e-12):
            raise BudgetError(
                f"the FLOP budget keeps {budget.cost:,.0f} MACs per sample but {why} need "
                f"{cost:,.0f} ({cost / self.cm.dense_macs:.2%}); raise the budget, lower "
                "min_density or round_to, or name fewer keep_layers")
        if budget.size is not None and size > budget.size:
            raise BudgetError(
                f"the parameter budget keeps {budget.size:,} but {why} need {size:,.0f} "
                f"({size / self.total_params:.2%}); raise the budget or lower min_density")
        if budget.latency is not None:
            secs = self.latency.seconds(self.dead(least))
            if secs > budget.latency:
                total = self.latency.total
                raise BudgetError(
                    f"the latency budget keeps {budget.latency / total:.2%} of the dense "
                    f"network's {total * 1e3:.3g} ms but {why} take {secs / total:.2%} "
                    "(measured layer by layer); raise the budget, lower min_density or "
                    "round_to, or name fewer keep_layers")

    # -- unit bookkeeping -----------------------------------------------------------------------
    def dead(self, keep: torch.Tensor) -> list[int]:
        """(G,) units of each group not in ``keep`` (m,) bool."""
        return torch.bincount(self.units.group[~keep], minlength=len(self.floors)).tolist()

    def latency_fraction(self, keep: torch.Tensor) -> float:
        """The latency table's predicted time of the choice ``keep`` (m,) bool, as a
        fraction of the dense network's."""
        return self.latency.seconds(self.dead(keep)) / self.latency.total

    def overrides(self, keep: torch.Tensor) -> dict[str, torch.Tensor]:
        """{name: value} of the non-weight parameters with the dead units' entries zeroed."""
        alive = self.units.alive_entries(keep)
        return {name: v * alive[a:a + v.numel()].view_as(v).to(v.dtype)
                for name, (a, v) in self.originals.items()}

    def param_masks(self, keep: torch.Tensor | None) -> dict[str, tuple]:
        keep = self.alive if keep is None else keep
        alive, values = self.units.alive_entries(keep), self.overrides(keep)
        return {name: (alive[a:a + v.numel()].view_as(v), values[name])
                for name, (a, v) in self.originals.items()}

    def alive_from_weights(self, mask: torch.Tensor) -> torch.Tensor:
        """(m,) bool: the units that still own a kept prunable weight under the flat weight
        mask (p,) bool (dead units' weights are all pruned)."""
        flat = self.units.space.flat[self.units.entries]
        ok = flat >= 0
        hit = torch.zeros(self.units.m, dtype=torch.int64)
        hit.index_add_(0, self.units.unit_of_entries()[ok], mask[flat[ok]].to(torch.int64))
        return hit > 0

    def apply(self, model: nn.Module, keep: torch.Tensor) -> None:
        """Zero, in place, the non-weight parameters of the units not in ``keep``."""
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, v in self.overrides(keep).items():
                params[name].copy_(v.to(params[name].device))
        self.alive = keep.clone()

    # -- a step ---------------------------------------------------------------------------------
    def choices(self, w: torch.Tensor, budget: UnitBudget
                ) -> tuple[UnitChoices, torch.Tensor]:
        allowed = self.units.weight_mask(self.alive)
        idx = positions(allowed)
        return UnitChoices(w[idx], self.units, self.costs, budget, self.alive, allowed,
                           self.config.round_to, self.latency), idx

    def evaluator(self, scorer: Callable | None, idx: torch.Tensor | None
                  ) -> Evaluate | None:
        if scorer is None:
            return None
        p = self.cm.num_weights
        return lambda v, selection: scorer(scatter(v, idx, p), self.overrides(selection.keep))

    def outcome(self, result: SolverResult, idx: torch.Tensor | None, ranks: Ranks,
                dtype: torch.dtype) -> Outcome:
        w = scatter(ranks.broadcast(result.w.detach().to("cpu", dtype)), idx,
                    self.cm.num_weights)
        keep = ranks.broadcast(result.keep)  # the same units on every rank
        mask = self.units.weight_mask(keep)
        return Outcome(result, w * mask, mask, keep)

    def commit(self, model: nn.Module, outcome: Outcome) -> None:
        write_weights(self.cm, outcome.w)
        self.apply(model, outcome.keep)

    def fractions(self) -> tuple[float, float]:
        """Exact kept fractions of the alive units: FLOPs, and parameters (or, with a
        latency table, the predicted time)."""
        cost, size = self.costs.exact(self.alive)
        return self.cm.fraction(cost, self.config.flops_of), size / self.total_params

    def extras(self) -> dict:
        out = {"units_kept": int(self.alive.sum())}
        if self.latency is not None:
            out["latency_predicted"] = self.latency_fraction(self.alive)
        return out

    def details(self) -> dict:
        return {"units": f"{int(self.alive.sum())} of {self.units.m} channels kept",
                "removed_channels": self.removed()}

    def removed(self) -> dict[str, list[int]]:
        """{group root layer: removed channels} of the current choice (every channel of a
        removed attention head)."""
        units, out = self.units, {}
        for g in range(len(units.groups)):
            dead = units.dead_channels(self.alive, g)
            if dead:
                first = int((units.group == g).nonzero()[0])
                out.setdefault(units.labels[first].rsplit("[", 1)[0], []).extend(dead)
        return out

    # -- the end ----------------------------------------------------------------------------------
    def finish(self, model: nn.Module, dtype: torch.dtype) -> None:
        """Remove the dead channels (Torch-Pruning's surgery), check that the smaller
        network runs with the same output shape, then restore ``dtype``."""
        remove_channels(self.units, self.alive)
        if self.probe is not None:
            try:
                with torch.no_grad():
                    out = self.call(model, self.probe)
            except RuntimeError as e:
                raise ModelError(
                    f"removing the chosen channels broke the model's forward pass ({e}); a "
                    "group's channels are probably split by the model in a way "
                    "structure='channels' does not model (e.g. a fused query/key/value "
                    "projection split before its heads): keep those layers whole with "
                    "keep_layers=[...] (globs, e.g. '*.attn.*')") from e
            now = self.config.task.output(out).shape
            if self.shape is not None and now != self.shape:
                raise BudgetViolation(f"internal error: the pruned network's output has "
                                      f"shape {tuple(now)} instead of {tuple(self.shape)}; "
                                      "please report this")
        if dtype in HALF:
            model.to(dtype)

    def _plain(self, model: nn.Module) -> nn.Module:
        return model  # physically smaller and mask-free already

    def _kept(self, plain: nn.Module) -> list[int]:
        return [plain.get_parameter(lay.name).numel() for lay in self.cm.layers]

    def _expected(self, count: MacCount, plain: nn.Module, kept: list[int]
                  ) -> tuple[float, int, list[tuple[str, float, float]]]:
        params = sum(p.numel() for p in plain.parameters())
        cost, size = self.costs.exact(self.alive)
        return count.dense, params, [("MACs", count.dense, cost),
                                     ("parameters", params, round(size))]

    def _within(self, budget: UnitBudget, macs: float, size: int) -> bool:
        secs = None if budget.latency is None else self.latency.seconds(self.dead(self.alive))
        return not ((budget.cost is not None and macs > budget.cost * (1 + 1e-12)) or (
            budget.size is not None and size > budget.size) or (
            secs is not None and secs > budget.latency * (1 + 1e-9)))

    def _size_fraction(self, size: int) -> float:
        return size / self.total_params
