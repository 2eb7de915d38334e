"""The stages of a one-shot run: each solves one step of the plan over the space and
commits it to the working copy; a multi-stage method records a trajectory row per stage
(budgets, kept fractions, held-out loss, what the solver chose)."""

from __future__ import annotations

import time

from tqdm.auto import tqdm

from falcon_prune.analysis.batchnorm import recalibrate_batchnorm
from falcon_prune.analysis.costs import flatten_weights
from falcon_prune.data.batches import Batch, to_device
from falcon_prune.data.tasks import metric_key
from falcon_prune.loss.heldout import HeldOutScorer
from falcon_prune.runs.setup import Run
from falcon_prune.runs.steps import scorer_of, solve
from falcon_prune.spaces.base import Outcome, Space


def solver_details(outcome: Outcome, history: list | None = None) -> dict:
    """What the solver chose: iterations, objective and, for falcon, the ridge, exponent,
    warm start and (with ``history``) every candidate's score."""
    res = outcome.result
    d: dict = {"iterations": res.iterations, "objective": res.objective}
    if res.ridge is not None:
        d.update(ridge=res.ridge, cost_exponent=res.beta, source=res.source,
                 saliency=res.saliency)
    if history:
        d["candidates"] = [h for h in history if "phase" in h]
    return d


def stage_scorer(r: Run) -> HeldOutScorer | None:
    """A multi-stage method's scorer of every stage's network on the held-out samples
    (None for a single-stage method or without held-out samples)."""
    if not r.context.method.multistage or not len(r.draw.held):
        return None
    return scorer_of(r.work, r.cm, r.draw.held, r.context)


def bn_inputs(r: Run, space: Space) -> Batch | None:
    """The BatchNorm re-estimation inputs on the device when the space re-estimates
    statistics between stages and for each candidate (None otherwise, or without
    ``recalibrate_bn``), moved once per run."""
    if r.draw.bn is None or not space.recalibrates:
        return None
    return to_device(r.context.task.inputs(r.draw.bn.batch), r.context.device)


def stage_row(k: int, space: Space, f_k, s_k, outcome: Outcome,
              scorer: HeldOutScorer | None, r: Run, seconds: float) -> dict:
    """A row of the trajectory: budgets, kept fractions, held-out loss and metric."""
    flops, second = space.fractions()
    row = {"stage": k, "flops_budget": f_k, f"{space.second}_budget": s_k,
           "flops_fraction": flops, "nnz_fraction": second, **space.extras()}
    known = outcome.held_out
    if known is None and scorer is not None:
        ev = scorer.evaluation(flatten_weights(r.cm))
        known = (ev.loss, ev.metric)
    if known is not None:
        row["held_out_loss"] = known[0]
        if known[1] is not None:
            row[metric_key("held_out", r.context.task)] = known[1]
    row["seconds"] = seconds
    row.update(solver_details(outcome))
    return row


def stage(r: Run, space: Space, k: int, f_k: float | None, s_k: float | None,
          scorer: HeldOutScorer | None, bn: Batch | None) -> tuple[Outcome, dict]:
    """Stage k at kept fractions ``f_k`` (FLOPs) and ``s_k`` (the space's second budget):
    the step solved and committed, BatchNorm statistics re-estimated on ``bn`` if given
    (the next stage's gradients see the statistics it will use); returns the outcome and
    its trajectory row."""
    ctx, t = r.context, time.perf_counter()
    outcome = solve(space, r.work, space.budget(f_k, s_k),
                    r.draw.fit(k, bool(r.config.resample)), r.draw.held, ctx, r.times, bn)
    space.commit(r.work, outcome)
    if bn is not None:
        recalibrate_batchnorm(r.work, bn, ctx.device, call=ctx.task.call)
    return outcome, stage_row(k, space, f_k, s_k, outcome, scorer, r,
                              time.perf_counter() - t)


def run_stages(r: Run, space: Space, scorer: HeldOutScorer | None, bn: Batch | None
               ) -> tuple[Outcome, list[dict]]:
    """Every stage of the plan in turn; returns the last outcome and the trajectory (empty
    for a single-stage method)."""
    multistage = r.context.method.multistage
    trajectory: list[dict] = []
    bar = tqdm(total=len(r.plan), desc=f"{r.config.method} stages", unit="stage",
               disable=not r.context.progress or not multistage)
    for k, (f_k, s_k) in enumerate(r.plan, 1):
        outcome, row = stage(r, space, k, f_k, s_k, scorer, bn)
        if multistage:
            trajectory.append(row)
            bar.update(1)
            bar.set_postfix(flops=f"{row['flops_fraction']:.3f}",
                            loss=f"{row.get('held_out_loss', float('nan')):.3g}")
    bar.close()
    return outcome, trajectory
