"""The space of single weights (structure='weights'): unstructured masks.

Items are the prunable weights themselves. A layer's weights all cost the same MACs, so
the budgets are solved by the ILP over cost groups (:mod:`falcon_prune.selection.ilp`),
floors first (:mod:`falcon_prune.selection.weights`). Weights that are zero when a run
starts, or that an earlier stage pruned, stay pruned unless ``revive``: a step's variables
are the weights still allowed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from falcon_prune.analysis.costs import CostModel, flatten_weights
from falcon_prune.analysis.masks import apply_weights, write_weights
from falcon_prune.analysis.prunable import masked_parameters
from falcon_prune.analysis.recount import MacCount
from falcon_prune.errors import BudgetError
from falcon_prune.loss.distributed import Ranks
from falcon_prune.loss.planning import HALF
from falcon_prune.loss.quadratic import QuadraticModel
from falcon_prune.loss.saliency import fisher_saliency, obs_saliency
from falcon_prune.methods.options import SolverResult
from falcon_prune.selection.groups import CostGroups
from falcon_prune.selection.weights import (
    Budget,
    per_weight_costs,
    select_ilp,
    select_prefix,
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


class WeightChoices(Choices):
    """A step over single weights: ``w_bar`` (p,) the weights still allowed, ``groups``
    their per-layer costs and ``budget`` the step's budgets on them (layer bounds
    renumbered to the allowed weights)."""

    def __init__(self, w_bar: torch.Tensor, groups: CostGroups, budget: Budget):
        self.w_bar, self.groups, self.budget = w_bar, groups, budget

    def magnitude(self) -> torch.Tensor:
        return self.w_bar.double() ** 2

    def scores_of(self, v: torch.Tensor) -> torch.Tensor:
        return v.to(torch.float64, copy=True).square_()

    def weighted(self, scores: torch.Tensor, beta: float) -> torch.Tensor:
        """ILP scores s_i f_i^beta (p,) float64: the projection in the norm weighted by
        f^beta. Grouped costs scale each group in place (no (p,) vector of f^beta)."""
        scores = scores.to(torch.float64, copy=True)
        if beta == 0:
            return scores
        if hasattr(self.groups, "costs"):  # per-weight costs, not grouped
            f = per_weight_costs(self.groups, scores.device).clamp_min(1e-12).pow_(beta)
            return scores.mul_(f)
        return self.groups.scale_(scores, self.groups.cost.clamp_min(1e-12).pow(beta).tolist())

    def select(self, scores: torch.Tensor) -> Selection:
        r = select_ilp(scores, self.groups, self.budget)
        return Selection(r.mask, None, r.gap, r.upper_bound)

    def prefix(self, scores: torch.Tensor) -> Selection:
        order = torch.argsort(scores, descending=True, stable=True)
        return Selection(select_prefix(order, self.groups, self.budget))

    def saliencies(self, qm: QuadraticModel, names: tuple[str, ...], rank: int | None
                   ) -> dict[str, torch.Tensor]:
        rules = {"magnitude": self.magnitude, "obs": lambda: obs_saliency(qm),
                 "fisher": lambda: fisher_saliency(qm)}
        return {name: rules[name]() for name in names}

    def active(self, factor: float | None) -> torch.Tensor | None:
        if factor is None:
            return None
        base = self.select(self.magnitude()).support
        k = min(self.w_bar.numel(), int(math.ceil(factor * int(base.sum()))))
        keep = torch.zeros(self.w_bar.numel(), dtype=torch.float64, device=self.w_bar.device)
        keep[torch.topk(self.w_bar.abs(), k).indices] = 1
        return keep


class WeightSpace(Space):
    """Single weights of the cost model's prunable layers. ``allowed`` (p,) bool: the
    weights a step may keep (None: all, with ``revive``); it starts as the non-zero
    weights and becomes each step's mask."""

    def __init__(self, cm: CostModel, config, allowed: torch.Tensor | None = None,
                 device: torch.device | str = "cpu"):
        super().__init__(cm, config)
        self.groups = CostGroups.from_layers(cm.layer_costs(), cm.layer_sizes(), device=device)
        self.allowed = allowed
        self.mask = None if allowed is None else allowed.clone()

    @classmethod
    def of(cls, cm: CostModel, config, device: torch.device | str = "cpu") -> WeightSpace:
        """The space of a run's working copy: weights that come in pruned (zero) stay
        pruned, unless ``revive``."""
        return cls(cm, config, None if config.revive else flatten_weights(cm) != 0, device)

    # -- budgets ------------------------------------------------------------------------------
    def floors(self) -> tuple[int, ...]:
        """The least number of weights each layer keeps: ``min_density`` of it, and at
        least one unless ``allow_empty_layers``."""
        least = 0 if self.config.allow_empty_layers else 1
        return tuple(min(lay.numel, max(least, math.ceil(self.config.min_density * lay.numel
                                                         - 1e-9)))
                     for lay in self.cm.layers)

    def budget(self, flops: float | None, nnz: float | None) -> Budget:
        cm = self.cm
        return Budget(None if nnz is None else int(math.floor(nnz * cm.num_weights + 1e-9)),
                      None if flops is None else cm.budget_macs(flops, self.config.flops_of),
                      self.floors(), tuple(cm.offsets))

    def check(self, budget: Budget) -> None:
        cm, cfg = self.cm, self.config
        need_count = sum(budget.floors)
        need_cost = sum(k * lay.cost for k, lay in zip(budget.floors, cm.layers, strict=True))
        why = (f"min_density={cfg.min_density} of every layer" if cfg.min_density > 0
               else "one weight in each layer")
        fix = ("lower min_density" if cfg.min_density > 0 else
               "pass allow_empty_layers=True (a layer with no weight left can make the "
               "network's output constant)")
        if budget.cost is not None and need_cost > budget.cost * (1 + 1e-12):
            raise BudgetError(
                f"the FLOP budget keeps {budget.cost:,.0f} MACs per sample but keeping {why} "
                f"needs {need_cost:,.0f} ({need_cost / cm.dense_macs:.2%} of the dense "
                f"model); raise the budget or {fix}")
        if budget.count is not None and need_count > budget.count:
            raise BudgetError(
                f"the weight budget keeps {budget.count:,} weights but keeping {why} needs "
                f"{need_count:,} ({need_count / cm.num_weights:.2%}); raise the budget or "
                f"{fix}")

    # -- a step ---------------------------------------------------------------------------------
    def choices(self, w: torch.Tensor, budget: Budget
                ) -> tuple[WeightChoices, torch.Tensor | None]:
        """The allowed weights' sub-problem (X then has only ``allowed.sum()`` columns)."""
        allowed = self.allowed
        if allowed is None or bool(allowed.all()):
            return WeightChoices(w, self.groups, budget), None
        idx = positions(allowed)
        return WeightChoices(w[idx], self.groups.subset(allowed),
                             budget.restricted(allowed)), idx

    def evaluator(self, scorer: Callable | None, idx: torch.Tensor | None
                  ) -> Evaluate | None:
        if scorer is None:
            return None
        p = self.cm.num_weights
        if idx is None:
            return lambda v, selection: scorer(v)
        return lambda v, selection: scorer(scatter(v, idx, p))

    def outcome(self, result: SolverResult, idx: torch.Tensor | None, ranks: Ranks,
                dtype: torch.dtype) -> Outcome:
        w = ranks.broadcast(result.w.detach().to("cpu", dtype))  # the same on every rank
        mask = ranks.broadcast(result.mask.to("cpu")) & (w != 0)
        if idx is not None:
            p = self.cm.num_weights
            w, mask = scatter(w, idx, p), scatter(mask, idx, p)
        return Outcome(result, w * mask, mask)

    def commit(self, model: nn.Module, outcome: Outcome) -> None:
        write_weights(self.cm, outcome.w)
        self.mask = outcome.mask
        if self.allowed is not None:  # later steps keep within it (no revive)
            self.allowed = outcome.mask

    def fractions(self) -> tuple[float, float]:
        """(FLOP fraction, weight fraction) kept by the non-zeros of the layers' weights."""
        cm = self.cm
        kept = torch.stack([wl.count_nonzero() for wl in cm.split(flatten_weights(cm))]
                           ).to("cpu", torch.float64)
        macs = float((kept * cm.layer_costs()).sum())
        return cm.fraction(macs, self.config.flops_of), float(kept.sum()) / cm.num_weights

    # -- the end ----------------------------------------------------------------------------------
    def finish(self, model: nn.Module, dtype: torch.dtype) -> None:
        """The model's dtype back, then the masks attached."""
        if dtype in HALF:
            model.to(dtype)
        mask = self.mask if self.mask is not None else flatten_weights(self.cm) != 0
        apply_weights(self.cm, flatten_weights(self.cm, dtype), mask)

    def _plain(self, model: nn.Module) -> nn.Module:
        """The model itself when it carries no mask (no copy), else a mask-free copy."""
        if next(masked_parameters(model), None) is None:
            return model
        return super()._plain(model)

    def _kept(self, plain: nn.Module) -> list[int]:
        return [int(plain.get_parameter(lay.name).detach().count_nonzero())
                for lay in self.cm.layers]

    def _expected(self, count: MacCount, plain: nn.Module, kept: list[int]
                  ) -> tuple[float, int, list[tuple[str, float, float]]]:
        cm = self.cm
        model_macs = sum(k * lay.cost for k, lay in zip(kept, cm.layers, strict=True))
        pairs = [("dense MACs", count.dense, cm.dense_macs),
                 ("kept MACs", count.kept, model_macs)]
        if self.config.flops_of == "model":
            pairs.append(("fixed MACs", count.fixed, cm.fixed_macs))
        return count.kept, sum(kept), pairs

    def _within(self, budget: Budget, macs: float, size: int) -> bool:
        return budget.fits(size, macs)

    def _size_fraction(self, size: int) -> float:
        return size / self.cm.num_weights
