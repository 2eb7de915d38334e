"""The interface of a pruning space: what a run chooses (single weights or channel units)
and everything that depends on it.

A :class:`Space` belongs to one run. It turns kept fractions into absolute budgets with the
floors every layer or group keeps (:meth:`~Space.budget`, :meth:`~Space.check`), gives each
step its :class:`Choices` (the weights that may still be kept, and how a selection is made
under the step's budgets), maps a solver's answer back to the network
(:meth:`~Space.outcome`, :meth:`~Space.commit`), reports the kept fractions of a stage, and
at the end finishes the network and verifies it against the budgets through the
independent recount (:meth:`~Space.verify`). Methods (:mod:`falcon_prune.methods`) see only
:class:`Choices`, so one implementation of a method serves both spaces.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from falcon_prune.analysis.costs import CostModel
from falcon_prune.analysis.recount import MacCount, recount
from falcon_prune.errors import BudgetViolation
from falcon_prune.methods.options import SolverResult
from falcon_prune.results import LayerReport

if TYPE_CHECKING:
    from falcon_prune.config import PruneConfig
    from falcon_prune.data.tasks import Task
    from falcon_prune.loss.distributed import Ranks
    from falcon_prune.loss.quadratic import QuadraticModel

#: ``evaluate(w, selection)``: the held-out loss of the network with the step's variables
#: set to ``w`` (p,) and, for units, the non-weight parameters of the selection's removed
#: units zeroed
Evaluate = Callable[[torch.Tensor, "Selection"], float]


@dataclass
class Selection:
    """What a selection keeps: ``support`` (p,) bool over the step's variables, and
    ``keep`` (m,) bool when the items are units (None when they are the weights
    themselves); the ILP's or knapsack's ``gap`` and ``upper_bound`` where known."""

    support: torch.Tensor
    keep: torch.Tensor | None = None
    gap: float | None = None
    upper_bound: float | None = None


class Choices(ABC):
    """One step's choice, as a method sees it: the variables ``w_bar`` (p,) (the weights
    that may still be kept) grouped into *items* (single weights, or channel units), and
    the rules for choosing items under the step's budgets. Scores are per item, >= 0."""

    w_bar: torch.Tensor

    @abstractmethod
    def magnitude(self) -> torch.Tensor:
        """Per-item magnitude scores: w² per weight, or each unit's normalised norm."""

    @abstractmethod
    def scores_of(self, v: torch.Tensor) -> torch.Tensor:
        """Per-item squared norms of a vector ``v`` (p,) of the variables (float64)."""

    @abstractmethod
    def weighted(self, scores: torch.Tensor, beta: float) -> torch.Tensor:
        """``scores`` times each item's MACs to the power ``beta``: the selection's value
        per MAC is then score x MACs^(beta - 1), from FLOP-aware (beta = 0) to the plain
        score order (beta = 1)."""

    @abstractmethod
    def select(self, scores: torch.Tensor) -> Selection:
        """The items of largest total score under both budgets (and the floors)."""

    @abstractmethod
    def prefix(self, scores: torch.Tensor) -> Selection:
        """The floors, then the longest prefix of the items by decreasing score that fits
        (the rule of a sparsity-only method)."""

    @abstractmethod
    def saliencies(self, qm: QuadraticModel, names: tuple[str, ...], rank: int | None
                   ) -> dict[str, torch.Tensor]:
        """Per-item scores from the quadratic model: 'magnitude', 'obs' (the increase of Q
        when the item goes and the rest compensates; ``rank`` leading directions of the
        Gram matrix for units, None: all) and 'fisher' (no compensation)."""

    def start_ridges(self, lam: float) -> tuple[float | None, ...]:
        """The ridges a warm start is tried with (None: the surviving weights as they are,
        not back-solved)."""
        return (lam,)

    def active(self, factor: float | None) -> torch.Tensor | None:
        """(p,) 0/1 float64 of the variables IHT may use (the largest ``factor`` times as
        many as a FLOP-aware magnitude support keeps), or None for all."""
        return None

    def describe(self, selection: Selection) -> dict:
        """Extra facts about a candidate for the solver's history."""
        return {}

    def result(self, selection: Selection, w: torch.Tensor | None = None, **facts
               ) -> SolverResult:
        """A solver result keeping ``selection`` with weights ``w`` (default: ``w_bar``
        on the support)."""
        support = selection.support.to(self.w_bar.device)
        w = self.w_bar * support if w is None else w
        return SolverResult(w, support, selection.gap, selection.upper_bound,
                            keep=selection.keep, **facts)


@dataclass
class Outcome:
    """A step's outcome on the network: the solver's ``result``, the new flat weights
    ``w`` (p,) of every prunable weight (float64 for a float64 model, else float32) and
    their ``mask`` (p,) bool on the CPU, the units kept (``keep``, (m,) bool, for units),
    and the held-out (loss, metric) of the chosen weights if known."""

    result: SolverResult
    w: torch.Tensor
    mask: torch.Tensor
    keep: torch.Tensor | None = None
    held_out: tuple[float, float | None] | None = None


def _agree(a: float, b: float) -> bool:
    """Counts (integers) agree exactly, MACs to rounding (1e-6 relative)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)


def positions(allowed: torch.Tensor) -> torch.Tensor:
    """Sorted positions of the True entries of ``allowed`` (p,) bool, int32 where p allows
    (half the memory of int64 for a step's whole duration)."""
    idx = allowed.nonzero().reshape(-1)
    return idx.to(torch.int32) if allowed.numel() < 2**31 else idx


def scatter(v: torch.Tensor, idx: torch.Tensor, p: int) -> torch.Tensor:
    """(p,) zeros with ``v`` at the positions ``idx``."""
    out = torch.zeros(p, dtype=v.dtype, device=v.device)
    out[idx.to(v.device)] = v
    return out


class Space(ABC):
    """What one run chooses from, over the cost model ``cm`` of its working copy under
    ``config``. Subclasses: :class:`~falcon_prune.spaces.weights.WeightSpace` and
    :class:`~falcon_prune.spaces.units.UnitSpace`."""

    #: the name of a stage's second budget: 'nnz', or 'latency' with a latency table
    second = "nnz"
    #: whether candidates are scored, and later stages run, with the BatchNorm statistics
    #: re-estimated (``recalibrate_bn``): removing whole channels shifts them much
    recalibrates = False

    def __init__(self, cm: CostModel, config: PruneConfig):
        self.cm, self.config = cm, config

    # -- budgets ------------------------------------------------------------------------------
    @abstractmethod
    def budget(self, flops: float | None, second: float | None):
        """Absolute budgets of kept fractions ``flops`` and ``second`` (None: no limit),
        with the floors."""

    @abstractmethod
    def check(self, budget) -> None:
        """Refuse, before any work, a budget below what the floors need."""

    # -- a step ---------------------------------------------------------------------------------
    @abstractmethod
    def choices(self, w: torch.Tensor, budget) -> tuple[Choices, torch.Tensor | None]:
        """The step's :class:`Choices` for the current flat weights ``w`` (p,) (in the
        solvers' dtype) and ``budget``, and the positions of its variables among the p
        weights (None: all of them)."""

    @abstractmethod
    def evaluator(self, scorer: Callable | None, idx: torch.Tensor | None
                  ) -> Evaluate | None:
        """``evaluate(w, selection)`` from a held-out scorer of flat weights (None)."""

    @abstractmethod
    def outcome(self, result: SolverResult, idx: torch.Tensor | None, ranks: Ranks,
                dtype: torch.dtype) -> Outcome:
        """The solver's result as weights and mask of the whole network (the same on
        every rank), in ``dtype``."""

    @abstractmethod
    def commit(self, model: nn.Module, outcome: Outcome) -> None:
        """Write the outcome into the working copy ``model`` and remember the choice."""

    @abstractmethod
    def fractions(self) -> tuple[float, float]:
        """Kept fractions now: (FLOPs, the second budget's quantity)."""

    def extras(self) -> dict:
        """Further facts for a stage's row."""
        return {}

    def details(self) -> dict:
        """Further facts for ``result.details``."""
        return {}

    def param_masks(self, keep: torch.Tensor | None) -> dict[str, tuple]:
        """{parameter name: (kept entries (bool), values)} of the parameters other than
        the prunable weights that a choice ``keep`` masks (biases and norms of removed
        units); empty for single weights."""
        return {}

    # -- the end ----------------------------------------------------------------------------------
    @abstractmethod
    def finish(self, model: nn.Module, dtype: torch.dtype) -> None:
        """Make the working copy the returned network, in the model's ``dtype``."""

    @abstractmethod
    def _kept(self, plain: nn.Module) -> list[int]:
        """Kept weights of each prunable layer of the finished, mask-free network."""

    @abstractmethod
    def _expected(self, count: MacCount, plain: nn.Module, kept: list[int]
                  ) -> tuple[float, int, list[tuple[str, float, float]]]:
        """(kept MACs, kept size) by the recount and the network, and the (quantity,
        recounted, expected by the space's own accounting) pairs that must agree."""

    @abstractmethod
    def _within(self, budget, macs: float, size: int) -> bool:
        """Whether kept ``macs`` and ``size`` fit ``budget``."""

    def _plain(self, model: nn.Module) -> nn.Module:
        from falcon_prune.analysis.masks import plain_copy

        return plain_copy(model)

    def verify(self, model: nn.Module, budget, task: Task, inputs: object
               ) -> tuple[float, float, list[LayerReport]]:
        """Check the finished network against ``budget`` through the independent recount
        of :mod:`falcon_prune.analysis.recount` (run on model ``inputs`` by ``task``);
        returns (kept FLOP fraction, kept fraction of the second budget, per-layer
        reports). Raises BudgetViolation (a bug) if the recount disagrees with the space's
        own accounting or a budget is exceeded."""
        cfg, cm = self.config, self.cm
        plain = self._plain(model)
        excluded = {e.name for e in cm.excluded}
        count = recount(plain, inputs, task.call, excluded, cfg.include, cfg.exclude)
        unseen = sorted(set(count.uncounted) - excluded)
        kept = self._kept(plain)
        macs, size, pairs = self._expected(count, plain, kept)
        wrong = [f"{what} {a:,.0f} recounted, {b:,.0f} expected" for what, a, b in pairs
                 if not _agree(a, b)]
        if unseen or wrong:
            raise BudgetViolation(
                f"internal error: the independent recount disagrees with the "
                f"{type(self).__name__} ({'; '.join(wrong) or 'no disagreement'}; uncounted "
                f"{unseen}); please report this")
        if not self._within(budget, macs, size):
            raise BudgetViolation(
                f"internal error: the result keeps {size:,} ({self.second}) and {macs:,.0f} "
                f"MACs, over the budgets {budget}; please report this")
        reports = [LayerReport(lay.name, lay.kind, lay.numel, k, lay.dense_macs, k * lay.cost)
                   for k, lay in zip(kept, cm.layers, strict=True)]
        return cm.fraction(macs, cfg.flops_of), self._size_fraction(size), reports

    @abstractmethod
    def _size_fraction(self, size: int) -> float:
        """``size`` as the kept fraction of the second budget's quantity."""
