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
import warnings

import torch
from torch import nn
from tqdm.auto import tqdm

from falcon_prune.batches import Batch, map_tensors, to_device
from falcon_prune.batchnorm import recalibrate_batchnorm
from falcon_prune.config import PruneConfig
from falcon_prune.costs import CostModel, flatten_weights
from falcon_prune.engine import HeldOutScorer, Step, UnitState, scorer_of, solve_unit_step
from falcon_prune.errors import BudgetViolation, ModelError
from falcon_prune.group_solvers import UnitBudget
from falcon_prune.latency import (
    LATENCY_REPEATS,
    LATENCY_ROUNDS,
    LatencyTable,
    interleaved_seconds,
    latency_batch,
)
from falcon_prune.masks import clone_model, write_weights
from falcon_prune.oneshot import HALF, Run, bn_note, run_details, setup
from falcon_prune.recount import recount
from falcon_prune.results import LayerReport, PruneResult, peak_rss_mb
from falcon_prune.structure import channel_units, remove_channels
from falcon_prune.tasks import metric_key


def _row(k: int, state: UnitState, cm: CostModel, f_k, s_k, step: Step,
         scorer: HeldOutScorer | None, r: Run, seconds: float) -> dict:
    """A falcon++ trajectory row: budgets, exact kept fractions, units, held-out loss."""
    cost, size = state.costs.exact(state.alive)
    second = "nnz" if state.latency is None else "latency"
    row = {"stage": k, "flops_budget": f_k, f"{second}_budget": s_k,
           "flops_fraction": cost / cm.dense_macs, "nnz_fraction": size / state.total_params,
           "units_kept": int(state.alive.sum())}
    if state.latency is not None:
        row["latency_predicted"] = state.latency_fraction(state.alive)
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


def _stage_budget(state: UnitState, cm, flops: float | None, second: float | None
                  ) -> UnitBudget:
    """A stage's budgets: the plan's second budget is the latency fraction when the
    state has a latency table, else the parameter fraction."""
    if state.latency is not None:
        return state.budget(cm, flops, None, second)
    return state.budget(cm, flops, second)


def held_out_scorer(r: Run) -> HeldOutScorer | None:
    """falcon++'s scorer of every stage's network on the held-out samples (None for the
    single-stage methods or without held-out samples)."""
    if r.config.method != "falcon++" or not len(r.draw.held):
        return None
    return scorer_of(r.work, r.cm, r.draw.held, r.problem)


def bn_inputs(r: Run) -> Batch | None:
    """The BatchNorm re-estimation inputs on the device (None without ``recalibrate_bn``),
    moved once per run."""
    if r.draw.bn is None:
        return None
    return to_device(r.problem.task.inputs(r.draw.bn.batch), r.problem.device)


def run_unit_stages(r: Run, state: UnitState, scorer: HeldOutScorer | None,
                    bn: Batch | None) -> tuple[Step, list[dict]]:
    """Every stage of the plan: choose units, write the weights, zero the dead units."""
    multistage = r.config.method == "falcon++"
    trajectory: list[dict] = []
    bar = tqdm(total=len(r.plan), desc="falcon++ stages", unit="stage",
               disable=not r.problem.progress or not multistage)
    for k, (f_k, s_k) in enumerate(r.plan, 1):
        step, row = _stage(r, state, k, f_k, s_k, scorer, bn)
        if multistage:
            trajectory.append(row)
            bar.update(1)
    bar.close()
    return step, trajectory


def _stage(r: Run, state: UnitState, k: int, f_k: float | None, s_k: float | None,
           scorer: HeldOutScorer | None, bn: Batch | None) -> tuple[Step, dict]:
    """Stage k at kept fractions ``f_k`` (FLOPs) and ``s_k`` (parameters, or latency with
    a latency table): the step, its weights written and dead units zeroed, BatchNorm
    re-estimated on ``bn`` if given; returns the step and its trajectory row."""
    cm, problem, t = r.cm, r.problem, time.perf_counter()
    held = r.draw.held
    step = solve_unit_step(r.work, cm, state, _stage_budget(state, cm, f_k, s_k),
                           r.draw.fit(k, bool(r.config.resample)), held, problem, r.times, bn)
    write_weights(cm, step.w)
    state.apply(r.work, step.keep)
    if bn is not None:  # the next stage's gradients see the statistics it will use
        recalibrate_batchnorm(r.work, bn, problem.device, call=problem.task.call)
    return step, _row(k, state, cm, f_k, s_k, step, scorer, r, time.perf_counter() - t)


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
    secs = None if budget.latency is None else state.latency.seconds(state.dead(state.alive))
    if (budget.cost is not None and count.dense > budget.cost * (1 + 1e-12)) or (
            budget.size is not None and params > budget.size) or (
            secs is not None and secs > budget.latency * (1 + 1e-9)):
        raise BudgetViolation(
            f"internal error: the pruned network keeps {count.dense:,.0f} MACs and {params:,} "
            f"parameters ({secs} s predicted), over the budgets ({budget.cost}, {budget.size}, "
            f"{budget.latency} s); please report this")
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


def _latency_table(r: Run, state: UnitState, dense: nn.Module) -> tuple[LatencyTable, dict]:
    """The measured layer-time table of ``dense`` (a copy of the working network in the
    model's dtype) at ``latency_batch`` samples, calibrated on a copy that keeps half of
    every group's units; returns it and the calibration's record."""
    t = time.perf_counter()
    table = LatencyTable(dense, state.units, r.cm, latency_inputs(r), r.problem.task.call,
                         r.problem.device, LATENCY_REPEATS)
    half = torch.zeros(state.units.m, dtype=torch.bool)
    for g in range(len(state.floors)):
        idx = (state.units.group == g).nonzero().reshape(-1)
        half[idx[:max(int(state.floors[g]), -(-len(idx) // 2))]] = True
    dead = state.dead(half)
    measured = measure_fraction(r, dense, _pruned_copy(r, state, half))["measured_fraction"]
    table.calibrate(dead, measured)
    r.times["latency_table"] = time.perf_counter() - t
    return table, {"table_fraction": table.raw_seconds(dead) / table.total,
                   "measured_fraction": measured, "scale": table.scale}


def latency_inputs(r: Run) -> Batch:
    """``latency_batch`` samples made from the probe, floating tensors in the model's
    dtype: what every latency measurement of the run feeds the networks."""
    return map_tensors(latency_batch(r.probe, r.config.latency_batch),
                       lambda v: v.to(r.dtype) if v.is_floating_point() else v)


def measure_fraction(r: Run, dense: nn.Module, small: nn.Module) -> dict:
    """The time of ``small`` as a fraction of ``dense``'s at ``latency_batch`` samples,
    both run in turn in every repeat (median of 14), with the times in ms."""
    call, x = r.problem.task.call, latency_inputs(r)
    secs = interleaved_seconds({"dense": lambda: call(dense, x), "pruned": lambda: call(small, x)},
                               LATENCY_REPEATS * 2, r.problem.device)
    return {"measured_fraction": secs["pruned"] / secs["dense"],
            "dense_ms": secs["dense"] * 1e3, "pruned_ms": secs["pruned"] * 1e3}


def _pruned_copy(r: Run, state: UnitState, keep: torch.Tensor) -> nn.Module:
    """A physically smaller copy of the working network that keeps the units ``keep``,
    in the model's dtype (the units are rebuilt on the copy, which the graph tracer
    numbers the same way; the working copy keeps its full size)."""
    small = clone_model(r.work)
    call = r.problem.task.call
    cm = CostModel.from_model(small, r.probe, call, r.config.include, r.config.exclude)
    units = channel_units(small, cm, r.probe, call, r.config.keep_layers or ())
    if units.labels != state.units.labels or not torch.equal(units.group, state.units.group):
        raise BudgetViolation("internal error: the channel units of a copy of the network "
                              "differ from the run's; please report this")
    remove_channels(units, keep)
    return small.to(r.dtype).eval()


def meet_latency(r: Run, state: UnitState, latency: float, dense: nn.Module, step: Step,
                 trajectory: list[dict], scorer: HeldOutScorer | None, bn: Batch | None
                 ) -> tuple[Step, dict]:
    """Measure the pruned network against the ``dense`` one (same device, dtype and batch,
    interleaved medians); while it is slower than ``latency`` of it, run one more stage at
    the last FLOP budget with the table's budget lowered by the prediction's error (at most
    ``LATENCY_ROUNDS`` stages). Returns the last step and ``details['latency']``."""
    t, k = time.perf_counter(), len(r.plan)
    rounds: list[dict] = []
    target, before = latency, state.alive
    while True:
        m = measure_fraction(r, dense, _pruned_copy(r, state, state.alive))
        predicted = state.latency_fraction(state.alive)
        measured = m["measured_fraction"]
        rounds.append({"table_budget": target, "predicted_fraction": predicted, **m})
        if measured <= latency or len(rounds) > LATENCY_ROUNDS or (
                len(rounds) > 1 and torch.equal(before, state.alive)):
            break  # met, out of rounds, or the floors allow no smaller choice
        target = predicted * latency / measured
        k, before = k + 1, state.alive.clone()
        step, row = _stage(r, state, k, r.plan[-1][0], target, scorer, bn)
        if r.config.method == "falcon++":
            trajectory.append(row)
    r.times["latency_check"] = time.perf_counter() - t
    out = {"batch": r.config.latency_batch, "budget": latency, **rounds[-1],
           "extra_stages": len(rounds) - 1, "rounds": rounds,
           "widths_timed": len(state.latency.table)}
    if measured > latency:
        warnings.warn(
            f"the pruned network ran in {measured:.2f} of the dense one's time at batch "
            f"{out['batch']} on {r.problem.device} (measured side by side), above the latency "
            f"budget {latency:.2f}, after {len(rounds) - 1} extra stages; timings on a busy "
            "machine vary: see docs/api.md, 'Latency budgets'", UserWarning, stacklevel=4)
    return step, out


def run(model: nn.Module, data: object, flops: float | None, nnz: float | None,
        cfg: PruneConfig, given: frozenset, progress: bool, latency: float | None = None
        ) -> PruneResult:
    """Prune whole channels of a copy of ``model``; the result is physically smaller.
    ``latency``: the kept fraction of the measured time (``nnz`` is then None)."""
    t_start = time.perf_counter()
    r = setup(model, data, flops, nnz if latency is None else latency, cfg, given, progress)
    t = time.perf_counter()
    state = UnitState.build(r.work, r.cm, r.probe, r.config.task, r.config)
    r.times["units"] = time.perf_counter() - t
    dense = None if latency is None else clone_model(r.work).to(r.dtype).eval()
    if latency is not None:
        state.latency, calibration = _latency_table(r, state, dense)
    final = state.budget(r.cm, flops, nnz, latency)
    state.check(r.cm, final, r.config.round_to)
    with torch.no_grad():
        shape = r.problem.task.output(r.problem.task.call(r.work, r.probe)).shape
    scorer, bn = held_out_scorer(r), bn_inputs(r)
    step, trajectory = run_unit_stages(r, state, scorer, bn)
    if latency is not None:
        step, timing = meet_latency(r, state, latency, dense, step, trajectory, scorer, bn)
        timing["calibration"] = calibration
        del dense
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
    if latency is not None:
        details["latency"] = timing
    return PruneResult(
        model=r.work, config=r.config, flops_budget=flops, nnz_budget=nnz,
        flops_fraction=flops_kept, nnz_fraction=nnz_kept, dense_macs=r.cm.dense_macs,
        num_weights=r.cm.num_weights, layers=layers, ilp_gap=step.result.ilp_gap,
        ilp_upper_bound=None, times=r.times, peak_rss_mb=peak_rss_mb(), excluded=r.cm.excluded,
        fixed_macs=r.cm.fixed_macs, details=details, stages=trajectory)
