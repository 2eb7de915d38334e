"""One-shot pruning, single-stage or multi-stage (falcon++): the pipeline behind ``prune``.

1. Draw the samples the run uses (gradient pool, held-out set) by seed and sampling; the
   BatchNorm samples are the first of the same draw, so they never change the others.
2. Make a working copy of the model (float32 for a half-precision model), check the task
   on it, probe the cost model, and refuse budgets below the per-layer floors.
3. Solve each stage with the engine; pruned weights stay pruned unless ``revive``.
4. Attach masks, re-estimate BatchNorm statistics if asked, restore the dtype, and verify
   the budgets through the independent recount.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from falcon_prune.batches import Batch, Samples, collect, leaves, map_tensors, to_device
from falcon_prune.batchnorm import batchnorm_layers, recalibrate_batchnorm
from falcon_prune.config import GRADIENT_METHODS, PruneConfig, resolve_precisions
from falcon_prune.costs import CostModel, flatten_weights, prunable_parameters
from falcon_prune.distributed import Ranks, require_same_model, require_same_samples
from falcon_prune.engine import (
    HeldOutScorer,
    Problem,
    Step,
    budget_of,
    check_floors,
    kept_fractions,
    scorer_of,
    solve_step,
    verify,
)
from falcon_prune.errors import (
    BudgetError,
    DataError,
    FalconPruneError,
    ModelError,
    ModelTypeError,
)
from falcon_prune.ilp import CostGroups
from falcon_prune.masks import apply_weights, clone_model, make_permanent, write_weights
from falcon_prune.results import PruneResult, peak_rss_mb
from falcon_prune.schedules import stage_budgets
from falcon_prune.tasks import Task, metric_key

HALF = (torch.float16, torch.bfloat16)


def check_model(model: object) -> None:
    """Refuse what cannot be pruned at all: not a Module, or on the meta device."""
    if not isinstance(model, nn.Module):
        raise ModelTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if any(p.device.type == "meta" for p in model.parameters()):
        raise ModelError(
            "the model is on the meta device (its parameters have no values); load its "
            "weights first, e.g. model.to_empty(device='cpu') then load_state_dict")


def check_prunable(plain: nn.Module, include=None, exclude=None) -> None:
    """Refuse a model (its plain working copy: masks folded) that has no prunable
    parameter by the library's definition with ``include``/``exclude``."""
    if not prunable_parameters(plain, include, exclude):
        raise ModelError(f"{type(plain).__name__} has no prunable layers (Conv, Linear, "
                         "recurrent or attention weights, or what include= selects); nothing "
                         "to prune")


def float32_samples(s: Samples) -> Samples:
    """``s`` with its float16/bfloat16 tensors in float32."""
    return Samples(map_tensors(s.batch, lambda t: t.float() if t.dtype in HALF else t))


def working_copy(model: nn.Module, device: torch.device) -> tuple[nn.Module, torch.dtype]:
    """A plain (masks folded) copy on ``device`` in eval mode, in float32 when the model is
    float16/bfloat16; returns it and the model's own floating dtype."""
    work = make_permanent(clone_model(model)).eval().to(device)
    dtype = next((p.dtype for p in work.parameters() if p.is_floating_point()), torch.float32)
    if dtype in HALF:
        work = work.float()
    return work, dtype


@dataclass
class Draw:
    """The samples of a run: gradient samples are ``samples[:pool]`` (stage k takes the
    k-th block of ``n_fit``, cycling when ``resample``), held-out ones ``samples[pool:]``;
    ``bn`` the BatchNorm samples (None without recalibration)."""

    samples: Samples
    pool: int
    n_fit: int
    bn: Samples | None

    def in_float32(self) -> Draw:
        """The same samples with half-precision tensors in float32 (for the working copy
        of a half-precision model)."""
        bn = None if self.bn is None else float32_samples(self.bn)
        return Draw(float32_samples(self.samples), self.pool, self.n_fit, bn)

    @property
    def held(self) -> Samples:
        return self.samples.take(slice(self.pool, len(self.samples)))

    def fit(self, stage: int, resample: bool) -> Samples:
        """Stage ``stage``'s gradient samples: a view of the drawn samples where the rows
        are contiguous (no copy; each rank reads only its own share), a copy otherwise."""
        start = ((stage - 1) * self.n_fit) % self.pool if resample else 0
        if start + self.n_fit <= self.pool:
            return self.samples.take(slice(start, start + self.n_fit))
        return self.samples.take((torch.arange(self.n_fit) + start) % self.pool)


def draw(data: object, cfg: PruneConfig, given: frozenset, stages: int,
         progress: bool) -> tuple[Draw, PruneConfig]:
    """Draw the run's samples; returns them and the config with the values actually used
    (samples per gradient, held-out count, sampling)."""
    grad = cfg.method in GRADIENT_METHODS
    spg = cfg.samples_per_gradient or 1
    n_fit = cfg.n_gradients * spg if grad else 0
    least = cfg.n_gradients * (spg if "samples_per_gradient" in given else 1) if grad else 1
    n_held = cfg.n_validation or 0
    want = max(1, n_fit * (stages if cfg.resample else 1) + n_held)
    drawn = collect(data, max(want, cfg.recalibrate_bn), cfg.seed, cfg.sampling, least)
    pick = drawn.samples
    samples = pick.take(slice(0, want))
    if grad and len(samples) < n_fit:  # only a default samples_per_gradient gets here
        spg, n_fit = 1, cfg.n_gradients
        if progress:
            tqdm.write(f"{cfg.method}: {len(samples)} samples are fewer than "
                       f"{cfg.n_gradients} x {cfg.samples_per_gradient}; using 1 sample per "
                       "gradient", file=sys.stderr)
    n_held = min(n_held, len(samples) - n_fit)
    bn = pick.take(slice(0, cfg.recalibrate_bn)) if cfg.recalibrate_bn else None
    cfg = cfg.replace(samples_per_gradient=spg if grad else None, sampling=drawn.sampling,
                      n_validation=n_held if cfg.n_validation is not None else None)
    return Draw(samples, len(samples) - n_held, n_fit, bn), cfg


def check_task(model: nn.Module, samples: Samples, task: Task, device: torch.device) -> Batch:
    """Run the model on a few samples and the task's check on every target drawn; returns
    the first two samples' model inputs (on ``device``) for the cost model."""
    probe = samples.take(slice(0, min(8, len(samples)))).batch
    try:
        with torch.no_grad():
            pred, _ = task.run(model, to_device(probe, device))
    except FalconPruneError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError, KeyError) as e:
        raise DataError(
            f"the model could not run on the data ({type(e).__name__}: {e}); check that the "
            "batches hold what the model expects (task.split gives its inputs)") from e
    if not isinstance(pred, torch.Tensor):
        raise ModelError(f"the task's output gave {type(pred).__name__}, not a tensor")
    if task.check is not None:
        task.check(pred, task.split(samples.batch)[1])
    head = samples.take(slice(0, min(2, len(samples)))).batch
    return task.inputs(to_device(head, device))


def _stage_row(k: int, cm: CostModel, f_k, s_k, step: Step, scorer: HeldOutScorer | None,
               problem: Problem, seconds: float) -> dict:
    """A row of the falcon++ trajectory: budgets, kept fractions, held-out loss/metric."""
    task = problem.task
    flops, nnz = kept_fractions(cm, flops_of=problem.config.flops_of)
    row = {"stage": k, "flops_budget": f_k, "nnz_budget": s_k, "flops_fraction": flops,
           "nnz_fraction": nnz}
    known = step.held_out
    if known is None and scorer is not None:
        ev = scorer.evaluation(flatten_weights(cm))
        known = (ev.loss, ev.metric)
    if known is not None:
        row["held_out_loss"] = known[0]
        if known[1] is not None:
            row[metric_key("held_out", task)] = known[1]
    row["seconds"] = seconds
    row.update(solver_details(step, history=False))
    return row


def run_stages(work: nn.Module, cm: CostModel, groups: CostGroups, plan: list, d: Draw,
               problem: Problem, times: dict) -> tuple[Step, torch.Tensor, list[dict]]:
    """Solve every stage of ``plan`` in turn on the working copy; returns the last step,
    the final mask and the falcon++ trajectory."""
    cfg = problem.config
    multistage = cfg.method == "falcon++"
    held = d.held
    scorer = scorer_of(work, cm, held, problem) if multistage and len(held) else None
    # weights that come in pruned (zero) stay pruned, as do those of earlier stages
    mask = None if cfg.revive else flatten_weights(cm) != 0
    trajectory: list[dict] = []
    bar = tqdm(total=len(plan), desc="falcon++ stages", unit="stage",
               disable=not problem.progress or not multistage)
    for k, (f_k, s_k) in enumerate(plan, 1):
        t = time.perf_counter()
        allowed = None if cfg.revive else mask
        step = solve_step(work, cm, groups, budget_of(cm, f_k, s_k, cfg),
                          d.fit(k, bool(cfg.resample)), held, problem, allowed, times)
        write_weights(cm, step.w)
        mask = step.mask
        if multistage:
            trajectory.append(_stage_row(k, cm, f_k, s_k, step, scorer, problem,
                                         time.perf_counter() - t))
            bar.update(1)
            bar.set_postfix(flops=f"{trajectory[-1]['flops_fraction']:.3f}",
                            loss=f"{trajectory[-1].get('held_out_loss', float('nan')):.3g}")
    bar.close()
    return step, mask, trajectory


def solver_details(step: Step, history: list | None = None) -> dict:
    """What the solver chose: iterations, objective and, for falcon, the ridge, exponent,
    warm start and (with ``history``) every candidate's score."""
    res = step.result
    d: dict = {"iterations": res.iterations, "objective": res.objective}
    if res.ridge is not None:
        d.update(ridge=res.ridge, cost_exponent=res.beta, source=res.source,
                 saliency=res.saliency)
    if history:
        d["candidates"] = [h for h in history if "phase" in h]
    return d


def bn_note(model: nn.Module, samples: int) -> str:
    if not batchnorm_layers(model):
        return "no BatchNorm layers"
    if not samples:
        return "running statistics kept as trained"
    return f"running statistics re-estimated on {samples} samples after pruning"


def _finish(work: nn.Module, cm: CostModel, mask: torch.Tensor, d: Draw, problem: Problem,
            dtype: torch.dtype, times: dict) -> str:
    """BatchNorm statistics re-estimated if asked (the pruned weights are in place), the
    original dtype back, then the masks attached."""
    seen = 0
    if d.bn is not None:
        t = time.perf_counter()
        seen = recalibrate_batchnorm(work, problem.task.inputs(d.bn.batch), problem.device,
                                     call=problem.task.call)
        times["batchnorm"] = time.perf_counter() - t
    if dtype in HALF:
        work.to(dtype)
    apply_weights(cm, flatten_weights(cm, dtype), mask)
    return bn_note(work, seen)


@dataclass
class Run:
    """What the stages of one run share once it is set up."""

    work: nn.Module
    dtype: torch.dtype
    draw: Draw
    config: PruneConfig
    problem: Problem
    cm: CostModel
    probe: Batch
    recount_inputs: Batch
    plan: list
    times: dict


def setup(model: nn.Module, data: object, flops: float | None, nnz: float | None,
          cfg: PruneConfig, given: frozenset, progress: bool) -> Run:
    """Check the model, draw the samples, make the working copy, check the task and probe
    the cost model."""
    if flops is None and nnz is None:
        raise BudgetError("give at least one budget: flops=<fraction kept> and/or nnz=<fraction>")
    check_model(model)
    device = torch.device(cfg.device)
    plan = (stage_budgets(cfg.schedule, flops, nnz) if cfg.method == "falcon++"
            else [(flops, nnz)])
    work, dtype = working_copy(model, device)
    check_prunable(work, cfg.include, cfg.exclude)
    cfg = resolve_precisions(cfg, dtype)
    d, cfg = draw(data, cfg, given, len(plan), progress)
    # the recount runs the finished model in its own dtype, on the samples as given
    recount_inputs = cfg.task.inputs(to_device(d.samples.take(slice(0, 2)).batch, device))
    d = d.in_float32() if dtype in HALF else d
    ranks = Ranks.current()
    require_same_model(ranks, work)
    require_same_samples(ranks, leaves(d.samples.batch))
    progress = progress and ranks.is_main  # one progress bar, on rank 0
    problem = Problem(cfg, cfg.task, device, progress, ranks=ranks)
    problem.trace.progress = progress
    t = time.perf_counter()
    probe = check_task(work, d.samples, cfg.task, device)
    cm = CostModel.from_model(work, probe, cfg.task.call, cfg.include, cfg.exclude)
    times = {"costs": time.perf_counter() - t}
    return Run(work, dtype, d, cfg, problem, cm, probe, recount_inputs, plan, times)


def run(model: nn.Module, data: object, flops: float | None, nnz: float | None,
        cfg: PruneConfig, given: frozenset, progress: bool) -> PruneResult:
    """Prune a copy of ``model`` (see ``falcon_prune.prune``); ``cfg`` is resolved."""
    t_start = time.perf_counter()
    r = setup(model, data, flops, nnz, cfg, given, progress)
    cm, cfg, problem, times = r.cm, r.config, r.problem, r.times
    groups = CostGroups.from_layers(cm.layer_costs(), cm.layer_sizes(), device=problem.device)
    final = budget_of(cm, flops, nnz, cfg)
    check_floors(cm, final, cfg)
    step, mask, trajectory = run_stages(r.work, cm, groups, r.plan, r.draw, problem, times)
    bn_note = _finish(r.work, cm, mask, r.draw, problem, r.dtype, times)
    flops_kept, nnz_kept, layers = verify(r.work, cm, final, cfg.task, r.recount_inputs,
                                          (cfg.include, cfg.exclude), cfg.flops_of)
    times["total"] = time.perf_counter() - t_start
    return PruneResult(
        model=r.work, config=cfg, flops_budget=flops, nnz_budget=nnz,
        flops_fraction=flops_kept, nnz_fraction=nnz_kept, dense_macs=cm.dense_macs,
        num_weights=cm.num_weights, layers=layers, ilp_gap=step.result.ilp_gap,
        ilp_upper_bound=step.result.ilp_upper_bound, times=times, peak_rss_mb=peak_rss_mb(),
        excluded=cm.excluded, fixed_macs=cm.fixed_macs, details=run_details(r, step, bn_note),
        stages=trajectory)


def run_details(r: Run, step: Step, bn_note: str) -> dict:
    """``result.details``: the solver's choices, storage and gradient notes, BatchNorm,
    and how falcon chose among its candidates."""
    details = {**solver_details(step, r.problem.trace.history), **r.problem.notes,
               "batchnorm": bn_note}
    if r.problem.step_method == "falcon":
        held = len(r.draw.held)
        details["selection"] = (f"held-out loss on {held} samples" if held
                                else "quadratic model (no held-out samples left in the data)")
    return details
