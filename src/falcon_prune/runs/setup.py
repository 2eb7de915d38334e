"""Setting a run up: the checks on the model, the samples drawn, the working copy, the task
run once and the cost model probed (:func:`setup`), shared by one-shot, multi-stage and
structured runs (and, piece by piece, by ``gradual``)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from falcon_prune.analysis.costs import CostModel
from falcon_prune.analysis.masks import clone_model, make_permanent
from falcon_prune.analysis.prunable import prunable_parameters
from falcon_prune.config import PruneConfig
from falcon_prune.data.batches import Batch, Samples, collect, leaves, map_tensors, to_device
from falcon_prune.data.tasks import Task
from falcon_prune.errors import (
    BudgetError,
    DataError,
    FalconPruneError,
    ModelError,
    ModelTypeError,
)
from falcon_prune.loss.distributed import Ranks, require_same_model, require_same_samples
from falcon_prune.loss.planning import HALF
from falcon_prune.methods import get_method
from falcon_prune.methods.schedules import stage_budgets
from falcon_prune.runs.context import RunContext
from falcon_prune.settings import resolve_precisions


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
    grad = get_method(cfg.method).gradients
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


def check_task(model: nn.Module, samples: Samples, task: Task, device: torch.device,
               count: int = 8) -> Batch:
    """Run the model on ``count`` samples and the task's check on every target drawn;
    returns the first two samples' model inputs (on ``device``) for the cost model."""
    probe = samples.take(slice(0, min(count, len(samples)))).batch
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


@dataclass
class Run:
    """What the stages of one run share once it is set up."""

    work: nn.Module
    dtype: torch.dtype
    draw: Draw
    config: PruneConfig
    context: RunContext
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
    plan = (stage_budgets(cfg.schedule, flops, nnz) if get_method(cfg.method).multistage
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
    context = RunContext(cfg, cfg.task, device, progress, ranks=ranks)
    context.trace.progress = progress
    t = time.perf_counter()
    probe = check_task(work, d.samples, cfg.task, device)
    cm = CostModel.from_model(work, probe, cfg.task.call, cfg.include, cfg.exclude)
    times = {"costs": time.perf_counter() - t}
    return Run(work, dtype, d, cfg, context, cm, probe, recount_inputs, plan, times)
