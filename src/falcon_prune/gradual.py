"""Gradual pruning with fine-tuning (METHOD.md section 6).

``gradual`` alternates pruning steps, each to the next level of a budget schedule and with
any method of the library (``mp`` gives classical gradual magnitude pruning), with
fine-tuning epochs in which ``torch.nn.utils.prune`` masks keep pruned weights at zero, and
ends with a fine-tune at the target. After every pruning step the BatchNorm running
statistics are re-estimated on training batches, since pruning changes every layer's
output distribution.

The run is a sequence of events (prune step k, epoch e of stage k, final epochs); with a
``checkpoint_dir`` the full state (model and masks, optimizer, LR schedule, RNG states,
history) is saved after every event, and ``resume=True`` continues from the last one.
Data order depends only on (seed, epoch number), so a resumed run ends with the same masks
and weights as an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune as torch_prune
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    TensorDataset,
    default_collate,
)
from tqdm.auto import tqdm

from falcon_prune.api import (
    DEFAULT_RIDGE,
    METHODS,
    NEEDS_GRADIENTS,
    _Problem,
    budget_of,
    check_device,
    check_fraction,
    clone_model,
    cost_model_of,
    find_prunable_modules,
    loss_and_accuracy,
    make_permanent,
    masks_of,
    solve_step,
    write_rows,
)
from falcon_prune.batchnorm import recalibrate_batchnorm
from falcon_prune.costs import CostModel
from falcon_prune.fisher import LossFn, SampleSource, as_samples
from falcon_prune.ilp import CostGroups
from falcon_prune.schedules import Schedule, as_schedule, stage_budgets
from falcon_prune.solvers import SolverOptions

CHECKPOINT_NAME = "gradual.pt"
OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer, int], object]


@dataclass
class GradualResult:
    """What ``gradual`` returns: the pruned, fine-tuned ``model`` (masks attached), its kept
    fractions, the ``history`` (one row per pruning step and per epoch) and seconds per
    phase."""

    model: nn.Module
    method: str
    flops_budget: float | None
    nnz_budget: float | None
    flops_fraction: float
    nnz_fraction: float
    history: list[dict]
    times: dict[str, float] = field(default_factory=dict)

    def write_history(self, path: str | Path) -> Path:
        """The history as CSV or JSON (by suffix)."""
        return write_rows(self.history, path)


def default_optimizer(lr: float, momentum: float, weight_decay: float) -> OptimizerFactory:
    """SGD with Nesterov-free momentum (the default of ``gradual``)."""
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum,
                                          weight_decay=weight_decay)


def cosine_schedule(optimizer: torch.optim.Optimizer, total_epochs: int):
    """Cosine decay of the LR over all epochs of the run, stepped once per epoch."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_epochs))


# DataLoader options ``gradual`` keeps from a user's loader (besides dataset, batch size and
# drop_last); its sampler, shuffle and generator are replaced by the seeded shuffling.
LOADER_OPTIONS = ("collate_fn", "num_workers", "worker_init_fn", "multiprocessing_context",
                  "prefetch_factor", "pin_memory", "timeout")


@dataclass
class _Feed:
    """Where training batches come from: a map-style ``dataset`` of (x, y) items, shuffled by
    (seed, epoch) and cut into batches of ``batch_size`` samples by a DataLoader with the
    options ``loader_kw`` kept from the user's loader (collate_fn, drop_last, workers)."""

    dataset: Dataset
    batch_size: int
    loader_kw: dict = field(default_factory=dict)

    def epoch(self, seed: int, epoch: int) -> DataLoader:
        return _loader(self.dataset, self.batch_size, seed, epoch, **self.loader_kw)

    def samples(self, n: int, seed: int) -> SampleSource:
        """``n`` samples, the seeded random subset ``as_samples`` draws, collated in one
        batch by the loader's ``collate_fn`` when it is a custom one."""
        collate = self.loader_kw.get("collate_fn")
        if collate in (None, default_collate):
            return as_samples(self.dataset, n, seed=seed)
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self.dataset), generator=g)[:n]
        return SampleSource(*_batch_pair(collate([self.dataset[int(i)] for i in idx])))


def _batch_pair(batch: object) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of a collated batch; anything else raises with the fix."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ValueError(
        f"a training batch must be an (inputs, targets) pair, got {type(batch).__name__}; make "
        "the dataset items (or the DataLoader's collate_fn) return (x, y)"
    )


def _as_feed(data: object, batch_size: int) -> _Feed:
    if isinstance(data, DataLoader):
        return _feed_of_loader(data, batch_size)
    if (isinstance(data, (tuple, list)) and len(data) == 2
            and all(isinstance(t, torch.Tensor) for t in data)):
        if len(data[0]) != len(data[1]):
            raise ValueError(
                f"train_data inputs and targets differ in length: {len(data[0])} vs "
                f"{len(data[1])}"
            )
        return _Feed(TensorDataset(data[0], data[1]), batch_size)
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset) \
            and hasattr(data, "__len__"):
        return _Feed(data, batch_size)
    raise TypeError(
        "train_data must be an (inputs, targets) tuple of tensors, a map-style Dataset of "
        f"(x, y) pairs or a DataLoader over one; got {type(data).__name__}"
    )


def _feed_of_loader(loader: DataLoader, batch_size: int) -> _Feed:
    """The dataset, batch size, drop_last and LOADER_OPTIONS of ``loader``; a sampler other
    than a plain Random/SequentialSampler is replaced with a warning."""
    if isinstance(loader.dataset, IterableDataset) or not hasattr(loader.dataset, "__len__"):
        raise TypeError(
            "train_data is a DataLoader over an iterable-style dataset; gradual shuffles by "
            "index with a seeded order (so that resume works) and needs a map-style Dataset "
            "with __len__ and __getitem__: pass a DataLoader over one"
        )
    bs = loader.batch_sampler
    if bs is None:
        raise ValueError(
            "train_data is a DataLoader with batch_size=None (no batching); give it a "
            "batch_size, or pass its dataset and batch_size=..."
        )
    plain = type(bs) is BatchSampler
    custom = _custom_sampler(bs)
    if custom is not None:
        warnings.warn(
            f"train_data's DataLoader uses {custom}; gradual replaces it by its own seeded "
            "shuffling (the data order depends only on seed and epoch, so that a resumed run "
            f"repeats it) in batches of {bs.batch_size if plain else batch_size} samples; pass "
            "a DataLoader with shuffle=True/False (or the dataset) to silence this",
            UserWarning, stacklevel=4,  # the caller of gradual
        )
    kw = {k: getattr(loader, k) for k in LOADER_OPTIONS}
    kw["drop_last"] = bs.drop_last if plain else False
    return _Feed(loader.dataset, bs.batch_size if plain else batch_size, kw)


def _custom_sampler(batch_sampler: object) -> str | None:
    """What in a loader's batch sampler is more than plain shuffling or sequential order."""
    if type(batch_sampler) is not BatchSampler:
        return f"a custom batch_sampler ({type(batch_sampler).__name__})"
    s = batch_sampler.sampler
    if type(s) is SequentialSampler:
        return None
    if type(s) is RandomSampler and not s.replacement and s.num_samples == len(s.data_source):
        return None
    return f"a custom sampler ({type(s).__name__})"


def _loader(dataset: Dataset, batch_size: int, seed: int, epoch: int, **loader_kw) -> DataLoader:
    """Batches of ``dataset`` in an order that depends only on (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=g, **loader_kw)


def device_of(model: nn.Module) -> torch.device:
    """Where the model's parameters live (batches are moved there); CPU without any."""
    return next((q.device for q in model.parameters()), torch.device("cpu"))


def _check_training_batch(model: nn.Module, feed: _Feed, loss_fn: LossFn) -> torch.Tensor:
    """Run the model and loss on the first two samples; return the first input (1, ...)."""
    collate = feed.loader_kw.get("collate_fn")
    xb, yb = _batch_pair(next(iter(DataLoader(feed.dataset, batch_size=2, collate_fn=collate))))
    xb, yb = xb.to(device_of(model)), yb.to(device_of(model))
    try:
        with torch.no_grad():
            model.eval()
            out = model(xb)
            loss = loss_fn(out, yb)
    except (RuntimeError, IndexError, ValueError) as e:
        raise ValueError(
            f"the model cannot be trained on train_data ({e}); check that the inputs have the "
            f"shape the model expects (got {tuple(xb.shape[1:])} per sample) and that the "
            "targets fit the loss (class indices below the number of outputs)"
        ) from e
    if not torch.isfinite(loss):
        raise ValueError("the loss on the first training batch is NaN/inf; check the data")
    return xb[:1]


def recalibrate_on(model: nn.Module, dataset: Dataset, batches: int, batch_size: int,
                   seed: int, **loader_kw) -> None:
    """Re-estimate BatchNorm running statistics on ``batches`` seeded training batches of
    ``batch_size`` samples (:func:`falcon_prune.batchnorm.recalibrate_batchnorm`; no
    gradient step). ``loader_kw`` are more DataLoader options (collate_fn, num_workers, ...).
    No-op for models without BatchNorm or with ``batches`` <= 0."""
    if batches <= 0:
        return
    loader = _loader(dataset, batch_size, seed, -1, **loader_kw)
    recalibrate_batchnorm(model, (_batch_pair(b)[0] for b in islice(loader, batches)),
                          device_of(model))


def _attach_masks(model: nn.Module) -> None:
    """Give every prunable layer a ``torch.nn.utils.prune`` mask (its non-zero pattern if it
    has none), so that parameters (``weight_orig``) stay the same objects all run long."""
    for _, module in find_prunable_modules(model):
        if not torch_prune.is_pruned(module):
            torch_prune.custom_from_mask(module, "weight", module.weight.detach() != 0)


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    return dict(find_prunable_modules(model))


def _write_back(model: nn.Module, cm: CostModel, w: torch.Tensor, mask: torch.Tensor) -> None:
    """Copy the solve's flat weights/mask into the masked training model, in place."""
    layers = _layers(model)
    with torch.no_grad():
        for lay, wl, ml in zip(cm.layers, cm.split(w), cm.split(mask), strict=True):
            m = layers[lay.name]
            m.weight_orig.copy_(wl.to(m.weight_orig.dtype))
            m.weight_mask.copy_(ml.to(m.weight_mask.dtype))


def _kept_fractions(model: nn.Module, cm: CostModel) -> tuple[float, float]:
    layers = _layers(model)
    kept = torch.tensor([float(layers[lay.name].weight_mask.sum()) for lay in cm.layers],
                        dtype=torch.float64)
    macs = float((kept * cm.layer_costs().to(torch.float64)).sum())
    return macs / cm.dense_macs, float(kept.sum()) / cm.num_weights


def _config(**kw) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items()}


def _run_config(*, optimizer, lr, momentum, weight_decay, lr_scheduler, loss_fn, options,
                schedule, feed, **settings) -> dict:
    """Every setting that changes the result of a run, as plain values (a checkpoint refuses
    to resume under others). Callables are recorded as 'custom' (or the default's name); the
    SGD hyperparameters only when the default optimizer uses them."""
    opt = {"optimizer": "sgd", "lr": lr, "momentum": momentum, "weight_decay": weight_decay} \
        if optimizer is None else {"optimizer": "custom"}
    solver = {k: v for k, v in asdict(options).items() if k not in ("progress", "history")}
    collate = feed.loader_kw.get("collate_fn")
    return _config(
        **settings, **opt, lr_scheduler="cosine" if lr_scheduler is None else "custom",
        loss_fn="cross_entropy" if loss_fn in (None, F.cross_entropy) else "custom",
        schedule=asdict(schedule), solver_options=solver, n_train=len(feed.dataset),
        batch_size=feed.batch_size, drop_last=feed.loader_kw.get("drop_last", False),
        collate_fn="default" if collate in (None, default_collate) else "custom",
    )


def _check_scheduler(lrs: object, checkpointing: bool) -> None:
    """The LR schedule must step; with checkpoints it must also save and restore its state."""
    name = type(lrs).__name__
    if not callable(getattr(lrs, "step", None)):
        raise TypeError(
            f"lr_scheduler(optimizer, total_epochs) returned a {name} without step(); return "
            "a torch.optim.lr_scheduler object (or one with step())"
        )
    if checkpointing and not all(callable(getattr(lrs, m, None))
                                 for m in ("state_dict", "load_state_dict")):
        raise TypeError(
            f"the lr_scheduler ({name}) has no state_dict()/load_state_dict(), so a checkpoint "
            "could not save its position and a resumed run would restart its schedule; with "
            "checkpoint_dir the scheduler must provide state_dict and load_state_dict (every "
            "torch.optim.lr_scheduler does), or run without checkpoint_dir"
        )


def _postfix(row: dict, stages: int, f_k: float | None, s_k: float | None,
             history: list[dict]) -> dict:
    """Progress bar postfix: stage, that stage's budgets (kept fractions) and the loss of
    the last training epoch (and the evaluation loss when there is evaluation data)."""
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


def gradual(
    model: nn.Module,
    train_data: object,
    flops: float | None = None,
    nnz: float | None = None,
    method: str = "falcon",
    schedule: Schedule | str | Sequence[float] | None = None,
    stages: int | None = None,
    epochs_per_stage: int = 1,
    final_epochs: int = 2,
    batch_size: int = 128,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    optimizer: OptimizerFactory | None = None,
    lr_scheduler: SchedulerFactory | None = None,
    eval_data: object = None,
    n_gradients: int = 500,
    n_validation: int = 500,
    ridge: float = DEFAULT_RIDGE,
    options: SolverOptions | None = None,
    bn_batches: int = 20,
    loss_fn: LossFn | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    callback: Callable[[dict], None] | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> GradualResult:
    """Gradually prune a copy of ``model`` to ``flops`` / ``nnz`` (kept fractions in (0, 1])
    with fine-tuning on ``train_data``: an (inputs, targets) tuple of tensors, a map-style
    Dataset of (x, y) items, or a DataLoader over one.

    Every epoch sees the data in batches of ``batch_size`` samples in a random order that
    depends only on (``seed``, epoch), so that a resumed run repeats it. Of a DataLoader,
    ``gradual`` takes its dataset, batch size (overriding ``batch_size``), drop_last,
    collate_fn and worker options (num_workers, worker_init_fn, multiprocessing_context,
    prefetch_factor, pin_memory, timeout); its sampler, shuffle and generator are replaced
    by that seeded shuffling, with a warning when they were more than a plain
    RandomSampler/SequentialSampler (a custom sampler or batch_sampler; then batches have
    ``batch_size`` samples). The collate_fn also collates the samples of the pruning steps
    and must return (inputs, targets).

    Stage k (of ``schedule``: default cubic over ``stages`` stages, 5 unless given; a list
    of kept fractions gives its own) prunes with ``method`` to its budgets, using
    ``n_gradients`` gradients and ``n_validation`` held-out samples drawn from
    ``train_data`` (pruned weights are never revived), re-estimates BatchNorm statistics on
    ``bn_batches`` batches, then fine-tunes ``epochs_per_stage`` epochs with
    the masks kept; ``final_epochs`` more epochs follow at the target. The optimizer is
    ``optimizer(params)`` (default SGD, ``lr``, ``momentum``, ``weight_decay``) and the LR
    schedule ``lr_scheduler(optimizer, total_epochs)`` stepped per epoch (default cosine to
    0). ``eval_data`` (optional) is evaluated after every event. ``callback(row)`` sees every
    history row. With ``checkpoint_dir`` the state is saved after every event (a custom LR
    schedule must then have ``state_dict``/``load_state_dict``) and ``resume=True`` continues
    from it; the checkpoint records every setting that changes the result (budgets,
    schedule, epochs, batches, data size, optimizer and its hyperparameters, solver options,
    ridge, n_gradients, n_validation, bn_batches, seed; custom optimizer, LR schedule, loss
    and collate_fn only as 'custom') and refuses to resume under other ones. The user's
    model is never modified; the returned copy lives on ``device`` (training, pruning
    steps and evaluation run there).
    """
    t_start = time.perf_counter()
    flops = check_fraction("flops", flops)
    nnz = check_fraction("nnz", nnz)
    if flops is None and nnz is None:
        raise ValueError("give at least one budget: flops=<fraction kept> and/or nnz=<fraction>")
    if method not in METHODS or method == "falcon++":
        raise ValueError(
            f"unknown method {method!r} for a gradual step; choose one of "
            f"{', '.join(m for m in METHODS if m != 'falcon++')}"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not find_prunable_modules(model):
        raise ValueError(f"{type(model).__name__} has no prunable layers; nothing to prune")
    for name, v, low in (("epochs_per_stage", epochs_per_stage, 0), ("final_epochs",
                         final_epochs, 0), ("batch_size", batch_size, 1),
                         ("n_gradients", n_gradients, 1), ("n_validation", n_validation, 0),
                         ("bn_batches", bn_batches, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
    sched = as_schedule(schedule, stages)
    plan = stage_budgets(sched, flops, nnz)
    total_epochs = len(plan) * epochs_per_stage + final_epochs
    if total_epochs == 0:
        raise ValueError(
            "epochs_per_stage and final_epochs are both 0: there is no fine-tuning; use "
            "falcon_prune.prune for one-shot pruning or give at least one epoch"
        )
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs the checkpoint_dir of the interrupted run")
    feed = _as_feed(train_data, batch_size)
    dataset = feed.dataset
    device = check_device(device)
    work = clone_model(model).to(device)
    sample_x = _check_training_batch(work, feed, loss_fn or F.cross_entropy)
    need = (n_gradients + n_validation) if method in NEEDS_GRADIENTS else 1
    if method in NEEDS_GRADIENTS and len(dataset) < n_gradients:
        raise ValueError(
            f"n_gradients={n_gradients} but train_data has {len(dataset)} samples; lower it"
        )
    evaluation = as_samples(eval_data) if eval_data is not None else None

    options = options if options is not None else SolverOptions(progress=False)
    config = _run_config(
        optimizer=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay,
        lr_scheduler=lr_scheduler, loss_fn=loss_fn, options=options, schedule=sched, feed=feed,
        flops=flops, nnz=nnz, method=method, levels=[list(b) for b in plan],
        epochs_per_stage=epochs_per_stage, final_epochs=final_epochs, n_gradients=n_gradients,
        n_validation=n_validation, ridge=ridge, bn_batches=bn_batches, seed=seed,
    )
    loss_fn = loss_fn or F.cross_entropy

    _attach_masks(work)
    opt = (optimizer or default_optimizer(lr, momentum, weight_decay))(list(work.parameters()))
    lrs = (lr_scheduler or cosine_schedule)(opt, total_epochs)
    _check_scheduler(lrs, checkpointing=checkpoint_dir is not None)
    events = []
    for k in range(1, len(plan) + 1):
        events += [("prune", k, 0)] + [("epoch", k, i) for i in range(1, epochs_per_stage + 1)]
    events += [("epoch", len(plan) + 1, i) for i in range(1, final_epochs + 1)]
    history: list[dict] = []
    start = 0
    ckpt = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    if resume:
        if not ckpt.exists():
            raise FileNotFoundError(f"resume=True but there is no checkpoint at {ckpt}")
        start, history = _load(ckpt, config, work, opt, lrs)
    elif ckpt is not None and ckpt.exists():
        raise FileExistsError(
            f"{ckpt} exists: pass resume=True to continue that run, or another checkpoint_dir"
        )
    if start == 0:
        torch.manual_seed(seed)

    plain = make_permanent(clone_model(work))
    cm = cost_model_of(plain, sample_x, sample_x.shape[1:])
    groups = CostGroups.from_layers(cm.layer_costs(), cm.layer_sizes(), device=device)
    problem = _Problem(n_gradients, 1, ridge, 0.0, None, options, loss_fn, torch.float32,
                       device, None, False)
    times = {"prune": 0.0, "train": 0.0}
    bar = tqdm(total=len(events), initial=start, desc=f"gradual {method}", unit="step",
               disable=not progress)
    for i in range(start, len(events)):
        kind, k, e = events[i]
        t = time.perf_counter()
        f_k, s_k = plan[min(k, len(plan)) - 1]
        if kind == "prune":
            row = _prune_step(work, feed, sample_x, cm, groups, f_k, s_k, method, problem,
                              need, seed + k, bn_batches)
            times["prune"] += time.perf_counter() - t
        else:
            row = {"train_loss": _train_epoch(work, opt, feed, seed, i, loss_fn)}
            row["lr"] = opt.param_groups[0]["lr"]
            lrs.step()
            times["train"] += time.perf_counter() - t
        row = {"event": i + 1, "phase": kind if kind == "prune" else
               ("final" if k > len(plan) else "finetune"), "stage": min(k, len(plan)),
               "epoch": e, **row}
        row["flops_fraction"], row["nnz_fraction"] = _kept_fractions(work, cm)
        if evaluation is not None:
            row["eval_loss"], row["eval_accuracy"] = loss_and_accuracy(work, evaluation, loss_fn,
                                                                       device)
        row["seconds"] = time.perf_counter() - t
        history.append(row)
        if ckpt is not None:
            _save(ckpt, config, i + 1, work, opt, lrs, history)
        bar.update(1)
        bar.set_postfix(_postfix(row, len(plan), f_k, s_k, history))
        if callback is not None:
            callback(row)
    bar.close()
    work.eval()
    f_final, s_final = _kept_fractions(work, cm)
    budget = budget_of(cm, flops, nnz)
    macs, count = f_final * cm.dense_macs, round(s_final * cm.num_weights)
    if not budget.fits(count, macs):
        raise RuntimeError(f"internal error: gradual {method} ended over budget; please report")
    times["total"] = time.perf_counter() - t_start
    return GradualResult(work, method, flops, nnz, f_final, s_final, history, times)


def _prune_step(work, feed, sample_x, cm, groups, f_k, s_k, method, problem, need, seed,
                bn_batches) -> dict:
    """Prune the masked training model in place to the stage budgets (never reviving);
    ``sample_x`` is one input (1, ...) for the cost model."""
    plain = make_permanent(clone_model(work)).eval()
    cm_plain = CostModel.from_model(plain, sample_x)
    masks = masks_of(work)
    allowed = torch.cat([masks[lay.name].reshape(-1) for lay in cm.layers])
    n_fit = problem.n_gradients if method in NEEDS_GRADIENTS else 1
    samples = feed.samples(min(need, len(feed.dataset)), seed)
    fit = SampleSource(samples.x[:n_fit], samples.y[:n_fit])
    held = SampleSource(samples.x[n_fit:], samples.y[n_fit:])
    res, w, mask = solve_step(plain, cm_plain, groups, budget_of(cm, f_k, s_k), method, fit,
                              held, problem, allowed)
    _write_back(work, cm, w, mask)
    recalibrate_on(work, feed.dataset, bn_batches, feed.batch_size, seed,
                          **feed.loader_kw)
    return {"flops_budget": f_k, "nnz_budget": s_k}


def _train_epoch(model, opt, feed: _Feed, seed, epoch, loss_fn) -> float:
    """One epoch of SGD steps over ``feed``; the mean training loss per sample."""
    model.train()
    total, count = 0.0, 0
    dev = device_of(model)
    for batch in feed.epoch(seed, epoch):
        xb, yb = (t.to(dev) for t in _batch_pair(batch))
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(xb), yb)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                "the training loss became NaN/inf; lower the learning rate (lr=...)"
            )
        loss.backward()
        opt.step()
        total += loss.item() * len(xb)
        count += len(xb)
    return total / max(1, count)


def _save(path: Path, config: dict, next_event: int, model, opt, lrs, history) -> None:
    state = {
        "config": config, "next_event": next_event, "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "lr_scheduler": lrs.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                "python": random.getstate()},
        "history": history,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: an interruption never leaves half a checkpoint


def _load(path: Path, config: dict, model, opt, lrs) -> tuple[int, list[dict]]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    saved = state["config"]
    if saved != config:
        absent = "<not set>"
        diff = {k: (saved.get(k, absent), config.get(k, absent))
                for k in sorted(saved.keys() | config.keys())
                if saved.get(k, absent) != config.get(k, absent)}
        raise ValueError(
            f"{path} belongs to a run with other settings {diff} (saved, now); resume with "
            "the same arguments or use another checkpoint_dir"
        )
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    if state["lr_scheduler"] is not None:  # None in checkpoints of older versions
        lrs.load_state_dict(state["lr_scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    return state["next_event"], state["history"]
