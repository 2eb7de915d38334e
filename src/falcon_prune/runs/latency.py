"""A measured latency budget (``latency=``, structure='channels').

The budget is a fraction of the dense network's time per forward at ``latency_batch``
samples on the run's device. Units are chosen with a lookup table of layer times measured
on this machine (:class:`~falcon_prune.analysis.timing.LatencyTable`), calibrated once on a
network that keeps half of every group. After the stages, the pruned network is measured
against the dense one side by side; while it is slower than the budget, one more stage
runs with the table's budget lowered by the prediction's error.
"""

from __future__ import annotations

import time
import warnings

import torch
from torch import nn

from falcon_prune.analysis.costs import CostModel
from falcon_prune.analysis.masks import clone_model
from falcon_prune.analysis.structure import channel_units, remove_channels
from falcon_prune.analysis.timing import (
    LATENCY_REPEATS,
    LATENCY_ROUNDS,
    LatencyTable,
    latency_batch,
    side_by_side,
)
from falcon_prune.data.batches import Batch, map_tensors
from falcon_prune.errors import BudgetViolation
from falcon_prune.loss.heldout import HeldOutScorer
from falcon_prune.runs.setup import Run
from falcon_prune.runs.stages import stage
from falcon_prune.spaces.base import Outcome
from falcon_prune.spaces.units import UnitSpace


def latency_table(r: Run, space: UnitSpace, dense: nn.Module) -> tuple[LatencyTable, dict]:
    """The measured layer-time table of ``dense`` (a copy of the working network in the
    model's dtype) at ``latency_batch`` samples, calibrated on a copy that keeps half of
    every group's units; returns it and the calibration's record."""
    t = time.perf_counter()
    table = LatencyTable(dense, space.units, r.cm, latency_inputs(r), r.context.task.call,
                         r.context.device, LATENCY_REPEATS)
    half = torch.zeros(space.units.m, dtype=torch.bool)
    for g in range(len(space.floors)):
        idx = (space.units.group == g).nonzero().reshape(-1)
        half[idx[:max(int(space.floors[g]), -(-len(idx) // 2))]] = True
    dead = space.dead(half)
    measured = measure_fraction(r, dense, pruned_copy(r, space, half))["measured_fraction"]
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
    measured side by side (:func:`~falcon_prune.analysis.timing.side_by_side`)."""
    return side_by_side(r.context.task.call, latency_inputs(r), dense, small,
                        r.context.device)


def pruned_copy(r: Run, space: UnitSpace, keep: torch.Tensor) -> nn.Module:
    """A physically smaller copy of the working network that keeps the units ``keep``,
    in the model's dtype (the units are rebuilt on the copy, which the graph tracer
    numbers the same way; the working copy keeps its full size)."""
    small = clone_model(r.work)
    call = r.context.task.call
    cm = CostModel.from_model(small, r.probe, call, r.config.include, r.config.exclude)
    units = channel_units(small, cm, r.probe, call, r.config.keep_layers or ())
    if units.labels != space.units.labels or not torch.equal(units.group, space.units.group):
        raise BudgetViolation("internal error: the channel units of a copy of the network "
                              "differ from the run's; please report this")
    remove_channels(units, keep)
    return small.to(r.dtype).eval()


def meet_latency(r: Run, space: UnitSpace, latency: float, dense: nn.Module, outcome: Outcome,
                 trajectory: list[dict], scorer: HeldOutScorer | None, bn: Batch | None
                 ) -> tuple[Outcome, dict]:
    """Measure the pruned network against the ``dense`` one (same device, dtype and batch,
    interleaved medians); while it is slower than ``latency`` of it, run one more stage at
    the last FLOP budget with the table's budget lowered by the prediction's error (at most
    ``LATENCY_ROUNDS`` stages). Returns the last step and ``details['latency']``."""
    t, k = time.perf_counter(), len(r.plan)
    rounds: list[dict] = []
    target, before = latency, space.alive
    while True:
        m = measure_fraction(r, dense, pruned_copy(r, space, space.alive))
        predicted = space.latency_fraction(space.alive)
        measured = m["measured_fraction"]
        rounds.append({"table_budget": target, "predicted_fraction": predicted, **m})
        if measured <= latency or len(rounds) > LATENCY_ROUNDS or (
                len(rounds) > 1 and torch.equal(before, space.alive)):
            break  # met, out of rounds, or the floors allow no smaller choice
        target = predicted * latency / measured
        k, before = k + 1, space.alive.clone()
        outcome, row = stage(r, space, k, r.plan[-1][0], target, scorer, bn)
        if r.context.method.multistage:
            trajectory.append(row)
    r.times["latency_check"] = time.perf_counter() - t
    out = {"batch": r.config.latency_batch, "budget": latency, **rounds[-1],
           "extra_stages": len(rounds) - 1, "rounds": rounds,
           "widths_timed": len(space.latency.table)}
    if measured > latency:
        warnings.warn(
            f"the pruned network ran in {measured:.2f} of the dense one's time at batch "
            f"{out['batch']} on {r.context.device} (measured side by side), above the latency "
            f"budget {latency:.2f}, after {len(rounds) - 1} extra stages; timings on a busy "
            "machine vary: see docs/api.md, 'Latency budgets'", UserWarning, stacklevel=4)
    return outcome, out
