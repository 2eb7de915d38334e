"""One-shot pruning, single- or multi-stage, of single weights or channel units: the
pipeline behind ``prune``.

1. Set up (:mod:`falcon_prune.runs.setup`): check the model, draw the samples, make the
   working copy, run the task once and probe the cost model.
2. Build the space (single weights, or channel units with their floors; for a latency
   budget, the measured table of layer times) and refuse budgets below its floors.
3. Solve every stage of the plan over the space (:mod:`falcon_prune.runs.stages`); pruned
   weights stay pruned unless ``revive``, removed units are removed for good.
4. Finish: re-estimate BatchNorm statistics if asked, attach the masks or remove the dead
   channels, restore the dtype, and verify the budgets through the independent recount.
"""

from __future__ import annotations

import time

from torch import nn

from falcon_prune.analysis.batchnorm import batchnorm_layers, recalibrate_batchnorm
from falcon_prune.analysis.masks import clone_model
from falcon_prune.config import PruneConfig
from falcon_prune.results import PruneResult, peak_rss_mb
from falcon_prune.runs.latency import latency_table, meet_latency
from falcon_prune.runs.setup import Run, setup
from falcon_prune.runs.stages import bn_inputs, run_stages, solver_details, stage_scorer
from falcon_prune.spaces.base import Outcome, Space
from falcon_prune.spaces.units import UnitSpace
from falcon_prune.spaces.weights import WeightSpace


def space_of(r: Run) -> Space:
    """The run's space: channel units (``structure='channels'``) or single weights."""
    if r.config.structure != "channels":
        return WeightSpace.of(r.cm, r.config, r.context.device)
    t = time.perf_counter()
    space = UnitSpace.build(r.work, r.cm, r.probe, r.context.task.call, r.config)
    r.times["units"] = time.perf_counter() - t
    return space


def bn_note(model: nn.Module, samples: int) -> str:
    if not batchnorm_layers(model):
        return "no BatchNorm layers"
    if not samples:
        return "running statistics kept as trained"
    return f"running statistics re-estimated on {samples} samples after pruning"


def finish(r: Run, space: Space) -> str:
    """BatchNorm statistics re-estimated if asked (the pruned weights are in place), then
    the space finishes the network (masks attached, or dead channels removed) in the
    model's dtype; returns the BatchNorm note."""
    seen = 0
    ctx = r.context
    if r.draw.bn is not None:
        t = time.perf_counter()
        seen = recalibrate_batchnorm(r.work, ctx.task.inputs(r.draw.bn.batch), ctx.device,
                                     call=ctx.task.call)
        r.times["batchnorm"] = time.perf_counter() - t
    t = time.perf_counter()
    space.finish(r.work, r.dtype)
    if isinstance(space, UnitSpace):
        r.times["surgery"] = time.perf_counter() - t
    return bn_note(r.work, seen)


def run_details(r: Run, outcome: Outcome, bn_note: str, space: Space) -> dict:
    """``result.details``: the solver's choices, storage and gradient notes, BatchNorm,
    how falcon chose among its candidates, and what the space adds."""
    details = {**solver_details(outcome, r.context.trace.history), **r.context.notes,
               "batchnorm": bn_note}
    if r.context.method.held_out:
        held = len(r.draw.held)
        details["selection"] = (f"held-out loss on {held} samples" if held
                                else "quadratic model (no held-out samples left in the data)")
    return {**details, **space.details()}


def run(model: nn.Module, data: object, flops: float | None, nnz: float | None,
        cfg: PruneConfig, given: frozenset, progress: bool, latency: float | None = None
        ) -> PruneResult:
    """Prune a copy of ``model`` (see ``falcon_prune.prune``); ``cfg`` is resolved.
    ``latency`` (structure='channels'): the kept fraction of the measured time (``nnz``
    is then None)."""
    t_start = time.perf_counter()
    second = nnz if latency is None else latency
    r = setup(model, data, flops, second, cfg, given, progress)
    space = space_of(r)
    dense = None
    if latency is not None:
        dense = clone_model(r.work).to(r.dtype).eval()
        space.latency, calibration = latency_table(r, space, dense)
    final = space.budget(flops, second)
    space.check(final)
    scorer, bn = stage_scorer(r), bn_inputs(r, space)
    outcome, trajectory = run_stages(r, space, scorer, bn)
    details = {}
    if latency is not None:
        outcome, timing = meet_latency(r, space, latency, dense, outcome, trajectory, scorer,
                                       bn)
        details["latency"] = {**timing, "calibration": calibration}
        del dense
    note = finish(r, space)
    flops_kept, nnz_kept, layers = space.verify(r.work, final, r.context.task,
                                                r.recount_inputs)
    r.times["total"] = time.perf_counter() - t_start
    return PruneResult(
        model=r.work, config=r.config, flops_budget=flops, nnz_budget=nnz,
        flops_fraction=flops_kept, nnz_fraction=nnz_kept, dense_macs=r.cm.dense_macs,
        num_weights=r.cm.num_weights, layers=layers, ilp_gap=outcome.result.ilp_gap,
        ilp_upper_bound=outcome.result.ilp_upper_bound, times=r.times,
        peak_rss_mb=peak_rss_mb(), excluded=r.cm.excluded, fixed_macs=r.cm.fixed_macs,
        details={**run_details(r, outcome, note, space), **details}, stages=trajectory)

