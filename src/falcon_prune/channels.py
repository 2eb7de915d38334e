"""Structured pruning (structure='channels'): the pipeline behind ``prune`` for it.

The working copy keeps its full size while stages run: a removed unit's weights are zero
and its biases and normalisation parameters too, so the network computes exactly what the
physically smaller one will. At the end Torch-Pruning's surgery removes the dead channels,
and the smaller network is checked against the budgets by the independent recount
(``torch.utils.flop_counter``) and a parameter count.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from falcon_prune.batches import to_device
from falcon_prune.batchnorm import recalibrate_batchnorm
from falcon_prune.config import PruneConfig
from falcon_prune.costs import CostModel, flatten_weights
from falcon_prune.engine import HeldOutScorer, Step, UnitState, solve_unit_step
from falcon_prune.errors import BudgetViolation, ModelError
from falcon_prune.group_solvers import UnitBudget
from falcon_prune.masks import write_weights
from falcon_prune.oneshot import HALF, Run, bn_note, run_details, setup
from falcon_prune.recount import recount
from falcon_prune.results import LayerReport, PruneResult, peak_rss_mb
from falcon_prune.structure import remove_channels
from falcon_prune.tasks import metric_key


def _row(k: int, state: UnitState, cm: CostModel, f_k, s_k, step: Step,
         scorer: HeldOutScorer | None, r: Run, seconds: float) -> dict:
    """A falcon++ trajectory row: budgets, exact kept fractions, units, held-out loss."""
    cost, size = state.costs.exact(state.alive)
    row = {"stage": k, "flops_budget": f_k, "nnz_budget": s_k,
           "flops_fraction": cost / cm.dense_macs, "nnz_fraction": size / state.total_params,
           "units_kept": int(state.alive.sum())}
    known = step.held_out
    if known is None and scorer is not None:
        ev = scorer.evaluation(flatten_weights(cm))
        known = (ev.loss, ev.metric)
    if known is not None:
        row["held_out_loss"] = known[0]
        if known[1] is not None:
            row[metric_key("held_out", r.problem.task)] = known[1]
    row["seconds"] = seconds
    return row


def run_unit_stages(r: Run, state: UnitState) -> tuple[Step, list[dict]]:
    """Every stage of the plan: choose units, write the weights, zero the dead units."""
    cm, cfg, problem = r.cm, r.config, r.problem
    multistage = cfg.method == "falcon++"
    held = r.draw.held
    scorer = (HeldOutScorer(r.work, cm, held, problem.task, problem.device,
                            ranks=problem.ranks)
              if multistage and len(held) else None)
    trajectory: list[dict] = []
    bar = tqdm(total=len(r.plan), desc="falcon++ stages", unit="stage",
               disable=not problem.progress or not multistage)
    bn = None if r.draw.bn is None else to_device(problem.task.inputs(r.draw.bn.batch),
                                                  problem.device)
    for k, (f_k, s_k) in enumerate(r.plan, 1):
        t = time.perf_counter()
        step = solve_unit_step(r.work, cm, state, state.budget(cm, f_k, s_k),
                               r.draw.fit(k, bool(cfg.resample)), held, problem, r.times, bn)
        write_weights(cm, step.w)
        state.apply(r.work, step.keep)
        if bn is not None:  # the next stage's gradients see the statistics it will use
            recalibrate_batchnorm(r.work, bn, problem.device, call=problem.task.call)
        if multistage:
            trajectory.append(_row(k, state, cm, f_k, s_k, step, scorer, r,
                                   time.perf_counter() - t))
            bar.update(1)
    bar.close()
    return step, trajectory


def _finish(r: Run, state: UnitState) -> str:
    """BatchNorm statistics re-estimated if asked, the dead channels removed, the dtype
    restored."""
    seen = 0
    if r.draw.bn is not None:
        t = time.perf_counter()
        seen = recalibrate_batchnorm(r.work, r.problem.task.inputs(r.draw.bn.batch),
                                     r.problem.device, call=r.problem.task.call)
        r.times["batchnorm"] = time.perf_counter() - t
    t = time.perf_counter()
    remove_channels(state.units, state.alive)
    r.times["surgery"] = time.perf_counter() - t
    try:
        with torch.no_grad():
            r.problem.task.call(r.work, r.probe)
    except RuntimeError as e:
        raise ModelError(
            f"removing the chosen channels broke the model's forward pass ({e}); a group's "
            "channels are probably split by the model in a way structure='channels' does "
            "not model (e.g. a fused query/key/value projection split before its heads): "
            "keep those layers whole with keep_layers=[...] (globs, e.g. '*.attn.*')") from e
    if r.dtype in HALF:
        r.work.to(r.dtype)
    return bn_note(r.work, seen)


def verify_units(r: Run, state: UnitState, budget: UnitBudget
                 ) -> tuple[float, float, list[LayerReport]]:
    """Recount the physically smaller network (``torch.utils.flop_counter``) and its
    parameters; both must agree with the exact unit totals and fit the budgets."""
    cm, small = r.cm, r.work
    excluded = {e.name for e in cm.excluded}
    count = recount(small, r.recount_inputs, r.problem.task.call, excluded,
                    r.config.include, r.config.exclude)
    params = sum(p.numel() for p in small.parameters())
    cost, size = state.costs.exact(state.alive)
    unseen = sorted(set(count.uncounted) - excluded)
    if unseen or not math.isclose(count.dense, cost, rel_tol=1e-6) or params != round(size):
        raise BudgetViolation(
            f"internal error: the pruned network has {count.dense:,.0f} MACs and {params:,} "
            f"parameters (uncounted {unseen}) but the channel choice says {cost:,.0f} and "
            f"{size:,.0f}; please report this")
    if (budget.cost is not None and count.dense > budget.cost * (1 + 1e-12)) or (
            budget.size is not None and params > budget.size):
        raise BudgetViolation(
            f"internal error: the pruned network keeps {count.dense:,.0f} MACs and {params:,} "
            f"parameters, over the budgets ({budget.cost}, {budget.size}); please report this")
    sizes = [small.get_parameter(lay.name).numel() for lay in cm.layers]
    layers = [LayerReport(lay.name, lay.kind, lay.numel, k, lay.dense_macs, k * lay.cost)
              for k, lay in zip(sizes, cm.layers, strict=True)]
    return count.dense / cm.dense_macs, params / state.total_params, layers


def _removed(state: UnitState) -> dict[str, list[int]]:
    """{group root layer: removed channels} of the final choice (every channel of a
    removed attention head)."""
    units, out = state.units, {}
    for g in range(len(units.groups)):
        dead = units.dead_channels(state.alive, g)
        if dead:
            first = int((units.group == g).nonzero()[0])
            out.setdefault(units.labels[first].rsplit("[", 1)[0], []).extend(dead)
    return out


def run(model: nn.Module, data: object, flops: float | None, nnz: float | None,
        cfg: PruneConfig, given: frozenset, progress: bool) -> PruneResult:
    """Prune whole channels of a copy of ``model``; the result is physically smaller."""
    t_start = time.perf_counter()
    r = setup(model, data, flops, nnz, cfg, given, progress)
    t = time.perf_counter()
    state = UnitState.build(r.work, r.cm, r.probe, r.config.task, r.config)
    final = state.budget(r.cm, flops, nnz)
    state.check(r.cm, final, r.config.round_to)
    with torch.no_grad():
        shape = r.problem.task.output(r.problem.task.call(r.work, r.probe)).shape
    r.times["units"] = time.perf_counter() - t
    step, trajectory = run_unit_stages(r, state)
    note = _finish(r, state)
    with torch.no_grad():
        now = r.problem.task.output(r.problem.task.call(r.work, r.probe)).shape
    if now != shape:
        raise BudgetViolation(f"internal error: the pruned network's output has shape "
                              f"{tuple(now)} instead of {tuple(shape)}; please report this")
    flops_kept, nnz_kept, layers = verify_units(r, state, final)
    r.times["total"] = time.perf_counter() - t_start
    details = {**run_details(r, step, note),
               "units": f"{int(state.alive.sum())} of {state.units.m} channels kept",
               "removed_channels": _removed(state)}
    return PruneResult(
        model=r.work, config=r.config, flops_budget=flops, nnz_budget=nnz,
        flops_fraction=flops_kept, nnz_fraction=nnz_kept, dense_macs=r.cm.dense_macs,
        num_weights=r.cm.num_weights, layers=layers, ilp_gap=step.result.ilp_gap,
        ilp_upper_bound=None, times=r.times, peak_rss_mb=peak_rss_mb(), excluded=r.cm.excluded,
        fixed_macs=r.cm.fixed_macs, details=details, stages=trajectory)
