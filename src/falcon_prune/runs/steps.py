"""One step of a run: prune the working copy's current weights to a budget, over a space.

The engine shared by one-shot pruning (every stage of falcon++) and ``gradual``: it asks
the space for the step's choices, computes the gradient matrix on the fit samples and
builds the quadratic model (methods with a loss model), builds the held-out scorer
(methods that score candidates), runs the method's solver, and returns the space's
:class:`~falcon_prune.spaces.base.Outcome`: new flat weights and mask, the same on every
process.
"""

from __future__ import annotations

import sys
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from falcon_prune.analysis.costs import CostModel, flatten_weights
from falcon_prune.data.batches import Batch, Samples
from falcon_prune.loss.gradients import gradient_store
from falcon_prune.loss.heldout import HeldOutScorer
from falcon_prune.loss.planning import compute_dtype_of
from falcon_prune.loss.quadratic import QuadraticModel
from falcon_prune.methods import Problem
from falcon_prune.runs.context import RunContext
from falcon_prune.spaces.base import Outcome, Space


def gradients(model: nn.Module, cm: CostModel, fit: Samples, ctx: RunContext,
              idx: torch.Tensor | None, times: dict) -> object:
    """The gradient matrix of a step (the columns ``idx`` of the prunable weights, None:
    all), with how it was stored noted once."""
    cfg = ctx.config
    t = time.perf_counter()
    X = gradient_store(
        model, cm, fit, cfg.n_gradients, cfg.samples_per_gradient, ctx.task, cfg.dtype,
        ctx.device, memory_limit=cfg.memory_limit, progress=ctx.progress,
        columns=idx, storage=cfg.storage, scratch_dir=cfg.scratch_dir,
        on_mode=lambda mode: ctx.notes.setdefault("gradients", mode), ranks=ctx.ranks,
        precision=torch.bfloat16 if cfg.gradient_precision == "bfloat16" else None)
    ranks = ctx.ranks
    if ranks.active and "distributed" not in ctx.notes:
        ctx.notes["distributed"] = (
            f"{ranks.world} processes (torch.distributed); gradient rows per rank "
            f"{ranks.sizes(cfg.n_gradients)}, products reduced across ranks")
    if "storage" not in ctx.notes:
        ctx.notes["storage"] = X.plan.describe()
        if ctx.progress:
            tqdm.write(ctx.notes["storage"], file=sys.stderr)
    times["gradients"] = times.get("gradients", 0.0) + time.perf_counter() - t
    return X


def scorer_of(model: nn.Module, cm: CostModel, held: Samples, ctx: RunContext,
              bn_inputs: Batch | None = None) -> HeldOutScorer:
    """The run's held-out scorer of ``model``, in its ``held_out_precision``; with
    ``bn_inputs``, each candidate's BatchNorm statistics are re-estimated on them."""
    precision = torch.bfloat16 if ctx.config.held_out_precision == "bfloat16" else None
    return HeldOutScorer(model, cm, held, ctx.task, ctx.device, bn_inputs=bn_inputs,
                         ranks=ctx.ranks, precision=precision)


def solve(space: Space, model: nn.Module, budget, fit: Samples, held: Samples,
          ctx: RunContext, times: dict | None = None, bn_inputs: Batch | None = None
          ) -> Outcome:
    """Prune the model's current plain weights to ``budget`` with the run's method, over
    ``space`` (whose cost model is ``model``'s). ``fit``: the gradient samples; ``held``:
    the held-out samples candidates are scored on (with ``bn_inputs``, after re-estimating
    BatchNorm statistics on them)."""
    times = times if times is not None else {}
    method, cfg, cm = ctx.method, ctx.config, space.cm
    # weights in float64 for a float64 model (magnitude methods keep them exactly), else
    # in the solvers' compute dtype
    w_all = flatten_weights(cm)
    wdtype = torch.float64 if w_all.dtype == torch.float64 else torch.float32
    w_all = w_all.to(wdtype if cfg.dtype is None else compute_dtype_of(cfg.dtype))
    choices, idx = space.choices(w_all, budget)
    del w_all  # a copy when restricted: one (p,) vector less for the whole step
    scorer = None
    if method.held_out and len(held):
        scorer = scorer_of(model, cm, held, ctx, bn_inputs)
    qm = None
    if method.gradients:
        X = gradients(model, cm, fit, ctx, idx, times)
        qm = QuadraticModel(X, choices.w_bar.to(ctx.device), cfg.ridge, cfg.alpha,
                            cfg.block_size)
    t = time.perf_counter()
    result = method.solve(Problem(choices, qm, cfg.solver, ctx.trace,
                                  space.evaluator(scorer, idx), cfg))
    times["solver"] = times.get("solver", 0.0) + time.perf_counter() - t
    for phase, seconds in ctx.trace.timings.items():  # cumulative over the run's steps
        times[f"solver:{phase}"] = seconds
    outcome = space.outcome(result, idx, ctx.ranks, wdtype)
    if scorer is not None and result.score in scorer.metric:
        outcome.held_out = (result.score, scorer.metric[result.score])
    return outcome
