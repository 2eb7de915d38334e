"""The solve engine shared by one-shot pruning (``prune``, falcon++) and ``gradual``.

One *step* prunes the model's current (plain) weights to a budget with one method: it
computes the gradient matrix on the fit samples (methods with a loss model), builds the
quadratic model, runs the solver with the held-out samples as the judge of its
candidates, and returns the new flat weights and mask. :func:`verify` checks a finished
network against its budgets through the independent recount.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from falcon_prune import solvers
from falcon_prune.batches import Batch, Samples, map_tensors, to_device
from falcon_prune.batchnorm import recalibrate_batchnorm
from falcon_prune.config import GRADIENT_METHODS, PruneConfig
from falcon_prune.costs import CostModel, flatten_weights
from falcon_prune.distributed import Ranks
from falcon_prune.errors import BudgetError, BudgetViolation, ConfigError
from falcon_prune.evaluation import Evaluation, evaluate_batches
from falcon_prune.fisher import gradient_store
from falcon_prune.group_solvers import (
    UnitBudget,
    UnitCosts,
    UnitProblem,
    group_falcon,
    group_magnitude,
)
from falcon_prune.ilp import CostGroups
from falcon_prune.latency import LatencyTable
from falcon_prune.masks import clone_model, plain_copy
from falcon_prune.quadratic import QuadraticModel
from falcon_prune.recount import recount
from falcon_prune.results import LayerReport
from falcon_prune.selection import Budget
from falcon_prune.solvers import SolverResult, SolverTrace
from falcon_prune.storage import compute_dtype_of
from falcon_prune.structure import ChannelUnits, channel_units
from falcon_prune.tasks import Task, TaskRunner


@dataclass
class Problem:
    """What every step of a run shares: the ``config`` (method, gradients, solver, storage),
    the ``task``, the ``device``, the solver ``trace``, ``notes`` on how X was stored
    and how its rows were computed, and the ``ranks`` that share the work (one process
    unless a ``torch.distributed`` group is initialised)."""

    config: PruneConfig
    task: Task
    device: torch.device
    progress: bool = False
    trace: SolverTrace = field(default_factory=SolverTrace)
    notes: dict = field(default_factory=dict)
    ranks: Ranks = field(default_factory=Ranks)

    @property
    def step_method(self) -> str:
        """The method of one step: falcon++'s stages are falcon solves."""
        return "falcon" if self.config.method == "falcon++" else self.config.method


# -- budgets ---------------------------------------------------------------------------------
def floors_of(cm: CostModel, config: PruneConfig) -> tuple[int, ...]:
    """The least number of weights each layer keeps: ``min_density`` of it, and at least
    one unless ``allow_empty_layers``."""
    least = 0 if config.allow_empty_layers else 1
    return tuple(min(lay.numel, max(least, math.ceil(config.min_density * lay.numel - 1e-9)))
                 for lay in cm.layers)


def budget_of(cm: CostModel, flops: float | None, nnz: float | None,
              config: PruneConfig) -> Budget:
    """Absolute budgets (kept weights, kept MACs) from kept fractions, with the floors."""
    return Budget(
        None if nnz is None else int(math.floor(nnz * cm.num_weights + 1e-9)),
        None if flops is None else cm.budget_macs(flops, config.flops_of),
        floors_of(cm, config), tuple(cm.offsets))


def check_floors(cm: CostModel, budget: Budget, config: PruneConfig) -> None:
    """Refuse, before any work, budgets below what the per-layer floors need."""
    need_count = sum(budget.floors)
    need_cost = sum(k * lay.cost for k, lay in zip(budget.floors, cm.layers, strict=True))
    why = (f"min_density={config.min_density} of every layer" if config.min_density > 0
           else "one weight in each layer")
    fix = ("lower min_density" if config.min_density > 0 else
           "pass allow_empty_layers=True (a layer with no weight left can make the "
           "network's output constant)")
    if budget.cost is not None and need_cost > budget.cost * (1 + 1e-12):
        raise BudgetError(
            f"the FLOP budget keeps {budget.cost:,.0f} MACs per sample but keeping {why} "
            f"needs {need_cost:,.0f} ({need_cost / cm.dense_macs:.2%} of the dense model); "
            f"raise the budget or {fix}")
    if budget.count is not None and need_count > budget.count:
        raise BudgetError(
            f"the weight budget keeps {budget.count:,} weights but keeping {why} needs "
            f"{need_count:,} ({need_count / cm.num_weights:.2%}); raise the budget or {fix}")


# -- held-out scores -------------------------------------------------------------------------
class HeldOutScorer:
    """The task's mean loss on the held-out samples of the network with flat prunable
    weights w (p,) (eval mode); remembers the metric that went with each loss it returned,
    so the stage record of the chosen candidate needs no second pass. With ``bn_inputs``
    (model inputs), each candidate's BatchNorm statistics are re-estimated on them first
    (in a scratch copy of the model, in the model's dtype), so candidates are judged as
    they will be used. With ``precision`` (bfloat16), the forward passes run with the
    weights, buffers and samples cast to it and the loss is taken in float32 from the
    cast-back predictions. With several ``ranks``, each evaluates its share of the
    held-out samples and the sums are reduced, so every rank gets the same loss."""

    def __init__(self, model: nn.Module, cm: CostModel, held: Samples, task: Task,
                 device: torch.device, batch: int = 256, bn_inputs: Batch | None = None,
                 ranks: Ranks | None = None, precision: torch.dtype | None = None):
        self.ranks = ranks or Ranks()
        held = held.take(slice(*self.ranks.bounds(len(held))))
        self.runner, self.cm, self.task = TaskRunner(model, task), cm, task
        self.names = ["model." + lay.name for lay in cm.layers]
        self.prunable = {id(lay.tensor) for lay in cm.layers}  # the parameters themselves
        self.precision = precision
        self.dtypes = [lay.tensor.dtype for lay in cm.layers]
        # on the device once; images channels-last (convolutions ~1.6x faster on CPU)
        self.batches = [map_tensors(to_device(b, device),
                                    lambda t: _channels_last(self._cast(t)))
                        for b in held.chunks(batch)]
        self.metric: dict[float, float | None] = {}
        self.bn_inputs, self.device = bn_inputs, device
        self.scratch = clone_model(model) if bn_inputs is not None else None
        self.scratch_runner = TaskRunner(self.scratch, task) if bn_inputs is not None else None

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.precision) if self.precision and t.is_floating_point() else t

    def _cast_all(self, module: nn.Module, skip: set[int] = frozenset()) -> dict:
        """Every parameter and buffer of ``module`` (names under ``model.``) in
        ``precision``, except the tensors whose ids are in ``skip`` (under any name: a
        weight tied to a prunable one takes its value from it in the call)."""
        named = [*module.named_parameters(), *module.named_buffers()]
        return {"model." + k: self._cast(v.detach()) for k, v in named if id(v) not in skip}

    def _params(self, w: torch.Tensor, overrides: dict | None, cast: bool = True
                ) -> dict[str, torch.Tensor]:
        """{name: tensor} of the prunable weights from ``w`` and the ``overrides``, in the
        model's dtypes, or in ``precision`` if set and ``cast``."""
        params = {n: t.to(self.precision if cast and self.precision else d)
                  for n, t, d in zip(self.names, self.cm.split(w), self.dtypes, strict=True)}
        params.update({"model." + k: self._cast(v) if cast else v
                       for k, v in (overrides or {}).items()})
        return params

    def evaluation(self, w: torch.Tensor, overrides: dict | None = None) -> Evaluation:
        """Loss and metric with flat weights ``w`` (p,) and, optionally, other parameters
        replaced (``overrides``: {parameter name: tensor}), over every rank's share."""
        if not self.ranks.active:
            return self._local(w, overrides)
        ev = self._local(w, overrides) if self.batches else None
        k = 0 if ev is None else ev.samples
        sums = torch.tensor([0.0, 0.0, 0.0] if ev is None else
                            [ev.loss * k, (ev.metric or 0.0) * k, k], dtype=torch.float64)
        loss, metric, n = self.ranks.all_sum(sums).tolist()
        return Evaluation(loss / n, metric / n if self.task.metric is not None else None,
                          self.task.metric_name, int(n))

    def _local(self, w: torch.Tensor, overrides: dict | None) -> Evaluation:
        """:meth:`evaluation` on this rank's held-out samples."""
        if self.scratch is None:
            # in ``precision``, the model's other parameters and buffers as they are now too
            fixed = {} if self.precision is None else self._cast_all(self.runner.model,
                                                                     self.prunable)
            runner, swap = self.runner, {**fixed, **self._params(w, overrides)}
        else:
            own = dict(self.scratch.named_parameters())
            with torch.no_grad():
                for name, value in self._params(w, overrides, cast=False).items():
                    own[name.removeprefix("model.")].copy_(value)
            recalibrate_batchnorm(self.scratch, self.bn_inputs, self.device,
                                  call=self.task.call)
            runner, swap = self.scratch_runner, (
                {} if self.precision is None else self._cast_all(self.scratch))
        try:
            with torch.inference_mode():
                return evaluate_batches(
                    lambda b: self._in_float(functional_call(runner, swap, (b,))),
                    self.batches, self.task)
        except (RuntimeError, TypeError) as e:
            if self.precision is None:
                raise
            raise ConfigError(
                f"the held-out scores could not be computed in {self.precision} ({e}); if "
                "the model runs in float32, pass held_out_precision='model'") from e

    def _in_float(self, out: Batch) -> Batch:
        """(prediction, targets) back in float32 when the pass ran in ``precision``."""
        if self.precision is None:
            return out
        return map_tensors(out, lambda t: t.float() if t.is_floating_point() else t)

    def __call__(self, w: torch.Tensor, overrides: dict | None = None) -> float:
        ev = self.evaluation(w, overrides)
        self.metric[ev.loss] = ev.metric
        return ev.loss


def scorer_of(model: nn.Module, cm: CostModel, held: Samples, problem: Problem,
              bn_inputs: Batch | None = None) -> HeldOutScorer:
    """The problem's held-out scorer of ``model``, in its ``held_out_precision``."""
    cfg = problem.config
    precision = torch.bfloat16 if cfg.held_out_precision == "bfloat16" else None
    return HeldOutScorer(model, cm, held, problem.task, problem.device,
                         bn_inputs=bn_inputs, ranks=problem.ranks, precision=precision)


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 4 and t.is_floating_point():
        return t.contiguous(memory_format=torch.channels_last)
    return t


# -- one step --------------------------------------------------------------------------------
def _gradients(model: nn.Module, cm: CostModel, fit: Samples, problem: Problem,
               idx: torch.Tensor | None, times: dict) -> object:
    """The gradient matrix of the step, with how it was stored noted once."""
    cfg = problem.config
    t = time.perf_counter()
    X = gradient_store(
        model, cm, fit, cfg.n_gradients, cfg.samples_per_gradient, problem.task, cfg.dtype,
        problem.device, memory_limit=cfg.memory_limit, progress=problem.progress,
        columns=idx, storage=cfg.storage, scratch_dir=cfg.scratch_dir,
        on_mode=lambda mode: problem.notes.setdefault("gradients", mode), ranks=problem.ranks,
        precision=torch.bfloat16 if cfg.gradient_precision == "bfloat16" else None)
    ranks = problem.ranks
    if ranks.active and "distributed" not in problem.notes:
        problem.notes["distributed"] = (
            f"{ranks.world} processes (torch.distributed); gradient rows per rank "
            f"{ranks.sizes(cfg.n_gradients)}, products reduced across ranks")
    if "storage" not in problem.notes:
        problem.notes["storage"] = X.plan.describe()
        if problem.progress:
            tqdm.write(problem.notes["storage"], file=sys.stderr)
    times["gradients"] = times.get("gradients", 0.0) + time.perf_counter() - t
    return X


def _run_method(method: str, w_bar: torch.Tensor, groups: CostGroups, budget: Budget,
                qm: QuadraticModel | None, problem: Problem, evaluate) -> SolverResult:
    opts, trace = problem.config.solver, problem.trace
    if method == "mp":
        return solvers.magnitude(w_bar, groups, budget)
    if method == "mp_flops":
        return solvers.magnitude_flops(w_bar, groups, budget)
    if method == "woodfisher":
        return solvers.woodfisher(qm, groups, budget)
    if method == "chita":
        return solvers.chita(qm, groups, budget, opts, trace)
    return solvers.falcon(qm, groups, budget, opts, trace, evaluate)


def _positions(allowed: torch.Tensor) -> torch.Tensor:
    """Sorted positions of the True entries of ``allowed`` (p,) bool, int32 where p allows
    (half the memory of int64 for a step's whole duration)."""
    idx = allowed.nonzero().reshape(-1)
    return idx.to(torch.int32) if allowed.numel() < 2**31 else idx


def _scatter(v: torch.Tensor, idx: torch.Tensor, p: int) -> torch.Tensor:
    out = torch.zeros(p, dtype=v.dtype, device=v.device)
    out[idx.to(v.device)] = v
    return out


@dataclass
class Step:
    """A step's outcome: the solver's result, the new flat weights (p,) (float64 for a
    float64 model, else float32) and mask (p,) bool on the CPU, and the held-out
    (loss, metric) of the chosen weights if known."""

    result: SolverResult
    w: torch.Tensor
    mask: torch.Tensor
    held_out: tuple[float, float | None] | None = None
    keep: torch.Tensor | None = None  # structure='channels': the units kept (m,) bool


def solve_step(model: nn.Module, cm: CostModel, groups: CostGroups, budget: Budget,
               fit: Samples, held: Samples, problem: Problem,
               allowed: torch.Tensor | None = None, times: dict | None = None) -> Step:
    """Prune the model's current plain weights to ``budget`` with the problem's method.

    ``allowed`` (p,) bool restricts the support to those weights (the others stay zero):
    the step is solved on the sub-vector, so X has only ``allowed.sum()`` columns."""
    times = times if times is not None else {}
    method, cfg = problem.step_method, problem.config
    # weights in float64 for a float64 model (magnitude methods keep them exactly), else
    # in the solvers' compute dtype
    w_all = flatten_weights(cm)
    wdtype = torch.float64 if w_all.dtype == torch.float64 else torch.float32
    w_all = w_all.to(wdtype if cfg.dtype is None else compute_dtype_of(cfg.dtype))
    if allowed is not None and bool(allowed.all()):
        allowed = None
    idx = None if allowed is None else _positions(allowed)
    w_bar = w_all if idx is None else w_all[idx]
    del w_all  # a copy when restricted: one (p,) vector less for the whole step
    sub_groups = groups if allowed is None else groups.subset(allowed)
    sub_budget = budget if allowed is None else budget.restricted(allowed)
    scorer = None
    if method == "falcon" and len(held):
        scorer = scorer_of(model, cm, held, problem)
    evaluate = scorer if (scorer is None or idx is None) else (
        lambda v: scorer(_scatter(v, idx, cm.num_weights)))
    qm = None
    if method in GRADIENT_METHODS:
        X = _gradients(model, cm, fit, problem, idx, times)
        qm = QuadraticModel(X, w_bar.to(problem.device), cfg.ridge, cfg.alpha, cfg.block_size)
    t = time.perf_counter()
    res = _run_method(method, w_bar, sub_groups, sub_budget, qm, problem, evaluate)
    times["solver"] = times.get("solver", 0.0) + time.perf_counter() - t
    for phase, seconds in problem.trace.timings.items():  # cumulative over the run's steps
        times[f"solver:{phase}"] = seconds
    w = problem.ranks.broadcast(res.w.detach().to("cpu", wdtype))  # the same on every rank
    mask = problem.ranks.broadcast(res.mask.to("cpu")) & (w != 0)
    if idx is not None:
        w, mask = _scatter(w, idx, cm.num_weights), _scatter(mask, idx, cm.num_weights)
    known = None
    if scorer is not None and res.score in scorer.metric:
        known = (res.score, scorer.metric[res.score])
    return Step(res, w * mask, mask, known)


def kept_fractions(cm: CostModel, w: torch.Tensor | None = None, flops_of: str = "prunable"
                   ) -> tuple[float, float]:
    """(FLOP fraction, weight fraction) kept by the non-zeros of flat weights ``w`` (p,)
    (default: the layers' current weights)."""
    w = flatten_weights(cm) if w is None else w
    kept = torch.stack([wl.count_nonzero() for wl in cm.split(w)]).to("cpu", torch.float64)
    macs = float((kept * cm.layer_costs()).sum())
    return cm.fraction(macs, flops_of), float(kept.sum()) / cm.num_weights


# -- verification ------------------------------------------------------------------------
def verify(model: nn.Module, cm: CostModel, budget: Budget, task: Task, inputs: Batch,
           selection: tuple = (None, None), flops_of: str = "prunable"
           ) -> tuple[float, float, list[LayerReport]]:
    """Check the finished network against ``budget`` through the independent recount of
    :mod:`falcon_prune.recount`; returns (kept FLOP fraction, kept weight fraction,
    per-layer reports). Raises BudgetViolation (a bug) if the recount disagrees with the
    cost model or a budget is exceeded."""
    plain = plain_copy(model)
    excluded = {e.name for e in cm.excluded}
    count = recount(plain, inputs, task.call, excluded, *selection)
    unseen = sorted(set(count.uncounted) - excluded)
    kept = [int(plain.get_parameter(lay.name).detach().count_nonzero()) for lay in cm.layers]
    model_macs = sum(k * lay.cost for k, lay in zip(kept, cm.layers, strict=True))
    same = math.isclose(count.dense, cm.dense_macs, rel_tol=1e-6) and math.isclose(
        count.kept, model_macs, rel_tol=1e-6, abs_tol=1e-6)
    if flops_of == "model":
        same = same and math.isclose(count.fixed, cm.fixed_macs, rel_tol=1e-6, abs_tol=1e-6)
    if unseen or not same:
        raise BudgetViolation(
            f"internal error: the independent recount ({count.kept:,.0f} of {count.dense:,.0f}"
            f" MACs, {count.fixed:,.0f} fixed; uncounted {unseen}) disagrees with the cost "
            f"model ({model_macs:,.0f} of {cm.dense_macs:,.0f}, {cm.fixed_macs:,.0f} fixed); "
            "please report this")
    if not budget.fits(sum(kept), count.kept):
        raise BudgetViolation(
            f"internal error: the result keeps {sum(kept)} weights / {count.kept:,.0f} MACs, "
            f"over the budgets ({budget.count}, {budget.cost}); please report this")
    reports = [LayerReport(lay.name, lay.kind, lay.numel, k, lay.dense_macs, k * lay.cost)
               for k, lay in zip(kept, cm.layers, strict=True)]
    return cm.fraction(count.kept, flops_of), sum(kept) / cm.num_weights, reports


# -- structure='channels' ---------------------------------------------------------------------
@dataclass
class UnitState:
    """The channel units of a run and which are still alive, with what a unit choice does
    to the parameters that are not prunable weights (biases, norms): their ``originals``
    and ranges in the global parameter space; ``latency``, the measured lookup table of a
    ``latency=`` budget."""

    units: ChannelUnits
    costs: UnitCosts
    floors: torch.Tensor
    alive: torch.Tensor
    total_params: int
    originals: dict[str, tuple[int, torch.Tensor]]
    latency: LatencyTable | None = None

    @classmethod
    def build(cls, model: nn.Module, cm: CostModel, inputs: Batch, task: Task,
              config: PruneConfig) -> UnitState:
        units = channel_units(model, cm, inputs, task.call, config.keep_layers or ())
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
        return cls(units, UnitCosts(units, entry_cost), floors,
                   torch.ones(units.m, dtype=torch.bool), space.size, originals)

    def budget(self, cm: CostModel, flops: float | None, nnz: float | None,
               latency: float | None = None) -> UnitBudget:
        """Absolute budgets: kept MACs of the prunable weights, kept parameters and
        predicted seconds per forward (``latency``: the kept fraction of the dense
        network's measured time)."""
        return UnitBudget(None if flops is None else flops * cm.dense_macs,
                          None if nnz is None else math.floor(nnz * self.total_params + 1e-9),
                          self.floors,
                          None if latency is None else latency * self.latency.total)

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

    def alive_params(self, keep: torch.Tensor) -> dict[str, torch.Tensor]:
        """{name: bool mask} of the non-weight parameters' entries that survive ``keep``."""
        alive = self.units.alive_entries(keep)
        return {name: alive[a:a + v.numel()].view_as(v) for name, (a, v) in
                self.originals.items()}

    def alive_from_weights(self, cm: CostModel, mask: torch.Tensor) -> torch.Tensor:
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

    def check(self, cm: CostModel, budget: UnitBudget, round_to: int | None = None) -> None:
        """Refuse budgets below what the layers kept whole and the least channels of every
        group (in multiples of ``round_to``) need."""
        least = torch.zeros(self.units.m, dtype=torch.bool)
        c, _ = self.costs.marginal(torch.ones(self.units.m, dtype=torch.bool))
        k = round_to or 1
        for g in range(len(self.floors)):  # each group's cheapest channels (or heads)
            idx = (self.units.group == g).nonzero().reshape(-1)
            kg = self.units.block(g, round_to)
            n = min(len(idx), -(-int(self.floors[g]) // kg) * kg)
            least[idx[torch.argsort(c[idx])[:n]]] = True
        cost, size = self.costs.exact(least)
        why = "the layers kept whole and the least channels of every group" + (
            f" ({k} per group with round_to={k})" if k > 1 else "")
        if budget.cost is not None and cost > budget.cost * (1 + 1e-12):
            raise BudgetError(
                f"the FLOP budget keeps {budget.cost:,.0f} MACs per sample but {why} need "
                f"{cost:,.0f} ({cost / cm.dense_macs:.2%}); raise the budget, lower "
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


def solve_unit_step(model: nn.Module, cm: CostModel, state: UnitState, budget: UnitBudget,
                    fit: Samples, held: Samples, problem: Problem, times: dict | None = None,
                    bn_inputs: Batch | None = None) -> Step:
    """Remove channel units from the model's current weights down to ``budget`` with the
    problem's method; the alive units' weights are the solver's variables. With
    ``bn_inputs`` the held-out scores are taken after re-estimating BatchNorm statistics
    on them (``recalibrate_bn``): without it a network missing channels is not judged as
    it will be used."""
    times = times if times is not None else {}
    method, cfg = problem.step_method, problem.config
    allowed = state.units.weight_mask(state.alive)
    idx = _positions(allowed)
    w_all = flatten_weights(cm)
    wdtype = torch.float64 if w_all.dtype == torch.float64 else torch.float32
    w_bar = w_all.to(wdtype if cfg.dtype is None else compute_dtype_of(cfg.dtype))[idx]
    up = UnitProblem.build(state.units, state.costs, budget, state.alive, allowed,
                           cfg.round_to, state.latency)
    t = time.perf_counter()
    if method in ("mp", "mp_flops"):
        out = group_magnitude(w_bar, up, flop_aware=method == "mp_flops")
    else:
        X = _gradients(model, cm, fit, problem, idx, times)
        qm = QuadraticModel(X, w_bar.to(problem.device), cfg.ridge, cfg.alpha)
        scorer = scorer_of(model, cm, held, problem, bn_inputs) if len(held) else None
        evaluate = None if scorer is None else (
            lambda v, keep: scorer(_scatter(v, idx, cm.num_weights), state.overrides(keep)))
        t = time.perf_counter()
        out = group_falcon(qm, up, cfg.solver, problem.trace, evaluate, cfg.obs_rank)
    times["solver"] = times.get("solver", 0.0) + time.perf_counter() - t
    for phase, seconds in problem.trace.timings.items():
        times[f"solver:{phase}"] = seconds
    res = out.result
    w = _scatter(problem.ranks.broadcast(res.w.detach().to("cpu", wdtype)), idx,
                 cm.num_weights)
    keep = problem.ranks.broadcast(out.keep)  # the same units on every rank
    mask = state.units.weight_mask(keep)
    known = None
    if method == "falcon" and len(held) and res.score in scorer.metric:
        known = (res.score, scorer.metric[res.score])
    return Step(res, w * mask, mask, known, keep)
