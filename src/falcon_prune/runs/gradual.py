"""Gradual pruning with fine-tuning (docs/method.md, gradual pruning).

``gradual`` alternates pruning steps, each to the next level of a budget schedule and with
any single-stage method of the library (``mp`` gives classical gradual magnitude
pruning), with fine-tuning epochs in which ``torch.nn.utils.prune`` masks keep pruned
weights at zero, and ends with a fine-tune at the target. After every pruning step the
BatchNorm running statistics are re-estimated on training batches. Each step is one solve
of the engine shared with ``prune`` (:mod:`falcon_prune.runs.steps`), over the same
space; the task says how batches run and what the loss is.

The run is a sequence of events (prune step k, epoch e of stage k, final epochs); with a
``checkpoint_dir`` the full state (model and masks, optimizer, LR schedule, RNG state,
history) is saved after every event, and ``resume=True`` continues from the last one.
Data order depends only on (seed, epoch number), so a resumed run ends with the same masks
and weights as an uninterrupted one. The caller's global RNG state is left as it was.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from falcon_prune.analysis.costs import CostModel, flatten_weights
from falcon_prune.analysis.masks import (
    attach_masks,
    attach_param_masks,
    clone_model,
    make_permanent,
    mask_params,
    masks_of,
    write_back,
)
from falcon_prune.config import GradualConfig, PruneConfig
from falcon_prune.data.batches import leaves, map_tensors, to_device
from falcon_prune.data.evaluation import evaluate
from falcon_prune.data.tasks import Task, metric_key
from falcon_prune.errors import BudgetError, ConfigError, DataError, OutputExistsError
from falcon_prune.loss.distributed import Ranks, require_same_model, require_same_samples
from falcon_prune.methods.schedules import stage_budgets
from falcon_prune.results import GradualResult
from falcon_prune.runs.checkpoints import (
    CHECKPOINT_NAME,
    check_scheduler,
    resumed,
    run_record,
    save_checkpoint,
)
from falcon_prune.runs.context import RunContext
from falcon_prune.runs.setup import (
    check_model,
    check_prunable,
    check_task,
    float32_samples,
    working_copy,
)
from falcon_prune.runs.steps import solve
from falcon_prune.runs.training import (
    Feed,
    OptimizerFactory,
    SchedulerFactory,
    as_feed,
    cosine_schedule,
    data_parallel,
    default_optimizer,
    recalibrate_on,
    train_epoch,
)
from falcon_prune.settings import check_fraction, resolve_gradual, resolve_precisions
from falcon_prune.spaces.base import Space
from falcon_prune.spaces.units import UnitSpace
from falcon_prune.spaces.weights import WeightSpace


def _kept_fractions(model: nn.Module, cm: CostModel, step: PruneConfig) -> tuple[float, float]:
    """(FLOPs, NNZ) kept by the masks, FLOPs as ``step.flops_of`` says; NNZ of the
    prunable weights, or with structure='channels' of all parameters (what the smaller
    network will hold)."""
    modules = dict(model.named_modules())
    kept = torch.tensor([float(model.get_buffer(lay.name + "_mask").sum())
                         for lay in cm.layers], dtype=torch.float64)
    macs = cm.fraction(float((kept * cm.layer_costs()).sum()), step.flops_of)
    if step.structure != "channels":
        return macs, float(kept.sum()) / cm.num_weights
    params = total = 0
    for name, p in model.named_parameters():
        mname, _, pname = name.rpartition(".")
        mask = getattr(modules[mname], pname.removesuffix("_orig") + "_mask", None)
        params += int(mask.sum()) if mask is not None and pname.endswith("_orig") \
            else p.numel()
        total += p.numel()
    return macs, params / total




@dataclass
class _Run:
    """What the events of one gradual run share."""

    work: nn.Module
    cm: CostModel
    feed: Feed
    probe: object
    recount_inputs: object
    context: RunContext
    config: GradualConfig
    need: int


def _prune_step(run: _Run, f_k: float | None, s_k: float | None, seed: int) -> dict:
    """Prune the masked training model in place to the stage budgets (never reviving)."""
    cfg, ctx = run.config.step, run.context
    plain, _ = working_copy(run.work, ctx.device)  # float32 for half models
    cm_plain = CostModel.from_model(plain, run.probe, ctx.task.call, cfg.include, cfg.exclude)
    masks = masks_of(run.work)
    allowed = torch.cat([masks[lay.name].reshape(-1) for lay in run.cm.layers])
    samples = float32_samples(run.feed.samples(min(run.need, len(run.feed.dataset)), seed))
    require_same_samples(ctx.ranks, leaves(samples.batch))
    n_fit = cfg.n_gradients if ctx.method.gradients else 0
    fit, held = samples.take(slice(0, n_fit)), samples.take(slice(n_fit, len(samples)))
    space = _space(plain, cm_plain, run, allowed)
    outcome = solve(space, plain, space.budget(f_k, s_k), fit, held, ctx)
    mask_params(run.work, space.param_masks(outcome.keep))
    write_back(run.work, run.cm, outcome.w, outcome.mask)
    recalibrate_on(run.work, run.feed, run.config.bn_batches, seed, ctx.task)
    row = {"flops_budget": f_k, "nnz_budget": s_k}
    if outcome.keep is not None:
        row["units_kept"] = int(outcome.keep.sum())
    return row


def _space(plain: nn.Module, cm: CostModel, run: _Run, allowed: torch.Tensor) -> Space:
    """The space of a plain copy of the training model whose kept weights are ``allowed``
    (p,) bool: those weights, or the units that still own one."""
    cfg = run.config.step
    if cfg.structure != "channels":
        return WeightSpace(cm, cfg, allowed, run.context.device)
    space = UnitSpace.build(plain, cm, run.probe, run.context.task.call, cfg)
    space.alive = space.alive_from_weights(allowed)
    return space


# -- the run ---------------------------------------------------------------------------------
def _postfix(row: dict, stages: int, f_k, s_k, history: list[dict]) -> dict:
    """Progress bar postfix: stage, that stage's budgets and the last training loss (and
    the evaluation loss when there is evaluation data)."""
    post = {"stage": f"{row['stage']}/{stages}"}
    if f_k is not None:
        post["flops_budget"] = f"{f_k:.3f}"
    if s_k is not None:
        post["nnz_budget"] = f"{s_k:.3f}"
    loss = next((r["train_loss"] for r in reversed(history) if "train_loss" in r), math.nan)
    post["loss"] = f"{loss:.3g}"
    if "eval_loss" in row:
        post["eval_loss"] = f"{row['eval_loss']:.3g}"
    return post


def _events(stages: int, epochs_per_stage: int, final_epochs: int) -> list[tuple[str, int, int]]:
    events = []
    for k in range(1, stages + 1):
        events += [("prune", k, 0)] + [("epoch", k, i) for i in range(1, epochs_per_stage + 1)]
    return events + [("epoch", stages + 1, i) for i in range(1, final_epochs + 1)]


def _setup(model, train_data, flops, nnz, config: GradualConfig) -> _Run:
    """Validate model and data, and build the training copy (masks attached), its cost
    model and the solver problem."""
    step = config.step
    check_model(model)
    device = torch.device(step.device)
    feed = as_feed(train_data, config.batch_size)
    first = feed.samples(min(len(feed.dataset), 8), step.seed)
    work = clone_model(model).to(device)
    plain, model_dtype = working_copy(work, device)
    step = resolve_precisions(step, model_dtype)
    config = config.replace(step=step)
    check_prunable(plain, step.include, step.exclude)
    probe = check_task(plain, float32_samples(first), step.task, device)
    raw = step.task.inputs(to_device(first.take(slice(0, 2)).batch, device))
    cm = CostModel.from_model(plain, probe, step.task.call, step.include, step.exclude)
    context = RunContext(step, step.task, device, ranks=Ranks.current())
    if step.structure == "channels":
        space = UnitSpace.build(plain, cm, probe, step.task.call, step)
    else:
        space = WeightSpace(cm, step, device=device)
    space.check(space.budget(flops, nnz))
    grads = context.method.gradients
    if grads and len(feed.dataset) < step.n_gradients:
        raise DataError(f"n_gradients={step.n_gradients} but train_data has "
                        f"{len(feed.dataset)} samples; lower it")
    attach_masks(work, cm)
    attach_param_masks(work, space.param_masks(None))  # from the start: resume needs them
    need = (step.n_gradients if grads else 1) + (step.n_validation or 0)
    require_same_model(context.ranks, work)
    return _Run(work, cm, feed, probe, raw, context, config, need)


def _event_row(run: _Run, event: tuple[str, int, int], i: int, plan, opt, lrs,
               eval_data, net: nn.Module) -> dict:
    """Run event ``i`` (a pruning step or an epoch, trained through ``net``: the training
    model or its DistributedDataParallel wrapper) and return its history row."""
    t = time.perf_counter()
    kind, k, e = event
    seed = run.config.step.seed
    f_k, s_k = plan[min(k, len(plan)) - 1]
    if kind == "prune":
        row = _prune_step(run, f_k, s_k, seed + k)
    else:
        row = {"train_loss": train_epoch(net, opt, run.feed, seed, i, run.context.task,
                                         run.context.ranks),
               "lr": opt.param_groups[0]["lr"]}
        lrs.step()
    row = {"event": i + 1,
           "phase": kind if kind == "prune" else ("final" if k > len(plan) else "finetune"),
           "stage": min(k, len(plan)), "epoch": e, **row}
    row["flops_fraction"], row["nnz_fraction"] = _kept_fractions(run.work, run.cm,
                                                                  run.config.step)
    if eval_data is not None:
        ev = evaluate(run.work, eval_data, run.context.task)
        row["eval_loss"] = ev.loss
        if ev.metric is not None:
            row[metric_key("eval", run.context.task)] = ev.metric
    row["seconds"] = time.perf_counter() - t
    return row


def gradual(
    model: nn.Module,
    train_data: object,
    flops: float | None = None,
    nnz: float | None = None,
    method: str | None = None,
    *,
    task: Task | str | Any = None,
    eval_data: object = None,
    optimizer: OptimizerFactory | None = None,
    lr_scheduler: SchedulerFactory | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    callback: Callable[[dict], None] | None = None,
    config: GradualConfig | None = None,
    seed: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    **settings: Any,
) -> GradualResult:
    """Gradually prune a copy of ``model`` to ``flops`` / ``nnz`` (kept fractions in (0, 1])
    with fine-tuning on ``train_data``: tensors, a map-style Dataset, or a DataLoader over
    one (its batch size, drop_last, collate_fn and worker options are kept; its sampler is
    replaced by a seeded shuffle, with a warning when it was more than plain shuffling).

    ``settings`` are fields of :class:`GradualConfig` (``schedule``, ``stages``,
    ``epochs_per_stage``, ``final_epochs``, ``batch_size``, ``lr``, ``momentum``,
    ``weight_decay``, ``bn_batches``) and of the steps' :class:`~falcon_prune.PruneConfig`
    (``n_gradients``, ``n_validation``, ``ridge``, ``solver``, ``min_density``, ...), over
    ``config`` or :func:`gradual_defaults`. ``task`` runs the batches and gives the loss
    (default classification). ``optimizer(params)`` (default SGD) and
    ``lr_scheduler(optimizer, total_epochs)`` (default cosine, stepped per epoch).
    ``eval_data`` is evaluated after every event; ``callback(row)`` sees every history row.
    With ``checkpoint_dir`` the state is saved after every event and ``resume=True``
    continues from it (refused under other settings). The user's model and global RNG are
    left as they were; the returned copy lives on ``device``.

    Under ``torchrun`` (an initialised ``torch.distributed`` group) each pruning step
    shares its gradients over the ranks and fine-tuning is data-parallel
    (DistributedDataParallel, each rank a seeded share of every epoch in batches of
    ``batch_size``); rank 0 alone writes checkpoints, shows progress and calls
    ``callback``; every rank returns the same model."""
    flops, nnz = check_fraction("flops", flops), check_fraction("nnz", nnz)
    if flops is None and nnz is None:
        raise BudgetError("give at least one budget: flops=<fraction kept> and/or nnz=<fraction>")
    run_settings = {k: v for k, v in (("task", task), ("seed", seed), ("device", device))
                    if v is not None}
    cfg = resolve_gradual(method, config, {**settings, **run_settings})
    plan = stage_budgets(cfg.schedule, flops, nnz)
    total_epochs = len(plan) * cfg.epochs_per_stage + cfg.final_epochs
    ckpt = _checkpoint_path(checkpoint_dir, resume, total_epochs)
    dev = torch.device(cfg.step.device)
    with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
        return _gradual(model, train_data, flops, nnz, cfg, plan, total_epochs, eval_data,
                        optimizer, lr_scheduler, ckpt, resume, callback, progress)


def _checkpoint_path(checkpoint_dir: str | Path | None, resume: bool, total_epochs: int
                     ) -> Path | None:
    """The run's checkpoint file (None without ``checkpoint_dir``), after refusing a run
    without fine-tuning, ``resume`` without a directory, and a fresh run over an existing
    checkpoint."""
    if total_epochs == 0:
        raise ConfigError("epochs_per_stage and final_epochs are both 0: there is no "
                          "fine-tuning; use falcon_prune.prune for one-shot pruning")
    if resume and checkpoint_dir is None:
        raise ConfigError("resume=True needs the checkpoint_dir of the interrupted run")
    ckpt = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    if ckpt is not None and not resume and Ranks.current().any(ckpt.exists()):
        raise OutputExistsError(
            f"{ckpt} exists: pass resume=True to continue that run, or another checkpoint_dir")
    return ckpt


def _gradual(model, train_data, flops, nnz, cfg: GradualConfig, plan, total_epochs,
             eval_data, optimizer, lr_scheduler, ckpt: Path | None, resume: bool, callback,
             progress: bool) -> GradualResult:
    t_start = time.perf_counter()
    run = _setup(model, train_data, flops, nnz, cfg)
    ranks = run.context.ranks
    progress = progress and ranks.is_main
    net = data_parallel(run.work, ranks)
    opt = (optimizer or default_optimizer(cfg.lr, cfg.momentum, cfg.weight_decay))(
        list(run.work.parameters()))
    lrs = (lr_scheduler or cosine_schedule)(opt, total_epochs)
    check_scheduler(lrs, checkpointing=ckpt is not None)
    record = run_record(cfg, run.feed, optimizer, lr_scheduler, plan)
    events = _events(len(plan), cfg.epochs_per_stage, cfg.final_epochs)
    start, history = 0, []
    if resume:
        start, history = resumed(ckpt, record, run.work, opt, lrs, ranks)
    else:
        torch.manual_seed(cfg.step.seed)  # inside fork_rng: the caller's state comes back
    times = {"prune": 0.0, "train": 0.0}
    bar = tqdm(total=len(events), initial=start, desc=f"gradual {cfg.step.method}",
               unit="step", disable=not progress)
    for i in range(start, len(events)):
        row = _event_row(run, events[i], i, plan, opt, lrs, eval_data, net)
        times["prune" if events[i][0] == "prune" else "train"] += row["seconds"]
        history.append(row)
        if ckpt is not None:
            if ranks.is_main:  # one writer; the others wait until the file is complete
                save_checkpoint(ckpt, record, i + 1, run.work, opt, lrs, history)
            ranks.barrier()
        bar.update(1)
        f_k, s_k = plan[min(events[i][1], len(plan)) - 1]
        bar.set_postfix(_postfix(row, len(plan), f_k, s_k, history))
        if callback is not None and ranks.is_main:
            callback(row)
    bar.close()
    run.work.eval()
    flops_kept, nnz_kept = _finish(run, flops, nnz)
    times["total"] = time.perf_counter() - t_start
    # the config as run: 'auto' precisions decided for this model and device
    return GradualResult(run.work, run.config, flops, nnz, flops_kept, nnz_kept, history,
                         times)


def _finish(run: _Run, flops: float | None, nnz: float | None) -> tuple[float, float]:
    """Check the trained network against the budgets through the independent recount;
    structure='channels' first folds the masks and removes the dead channels physically.
    Returns the kept fractions."""
    work, step, task = run.work, run.config.step, run.context.task
    if step.structure != "channels":
        space: Space = WeightSpace(run.cm, step)
    else:
        make_permanent(work)
        cm = CostModel.from_model(work, run.probe, task.call, step.include, step.exclude)
        space = UnitSpace.build(work, cm, run.probe, task.call, step)
        space.alive = space.alive_from_weights(flatten_weights(cm) != 0)
        dtype = next(work.parameters()).dtype  # the training model's own
        space.probe = map_tensors(run.probe, lambda t: t.to(dtype) if t.is_floating_point()
                                  else t)
        space.finish(work, dtype)
    flops_kept, nnz_kept, _ = space.verify(work, space.budget(flops, nnz), task,
                                           run.recount_inputs)
    return flops_kept, nnz_kept
