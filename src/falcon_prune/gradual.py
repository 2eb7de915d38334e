"""Gradual pruning with fine-tuning (docs/method.md, gradual pruning).

``gradual`` alternates pruning steps, each to the next level of a budget schedule and with
any single-stage method of the library (``mp`` gives classical gradual magnitude
pruning), with fine-tuning epochs in which ``torch.nn.utils.prune`` masks keep pruned
weights at zero, and ends with a fine-tune at the target. After every pruning step the
BatchNorm running statistics are re-estimated on training batches. Each step is one solve
of the engine shared with ``prune``; the task says how batches run and what the loss is.

The run is a sequence of events (prune step k, epoch e of stage k, final epochs); with a
``checkpoint_dir`` the full state (model and masks, optimizer, LR schedule, RNG state,
history) is saved after every event, and ``resume=True`` continues from the last one.
Data order depends only on (seed, epoch number), so a resumed run ends with the same masks
and weights as an uninterrupted one. The caller's global RNG state is left as it was.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import time
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import prune as torch_prune
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    TensorDataset,
)
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from falcon_prune.batches import Samples, collect, default_collate, leaves, to_device
from falcon_prune.batchnorm import recalibrate_batchnorm
from falcon_prune.config import (
    GRADIENT_METHODS,
    PruneConfig,
    check_fraction,
    defaults,
    resolve,
    resolve_precisions,
)
from falcon_prune.costs import CostModel, flatten_weights, parameter_holders
from falcon_prune.distributed import Ranks, require_same_model, require_same_samples
from falcon_prune.engine import (
    Problem,
    UnitState,
    budget_of,
    check_floors,
    solve_step,
    solve_unit_step,
    verify,
)
from falcon_prune.errors import (
    BudgetError,
    BudgetViolation,
    CheckpointError,
    ConfigError,
    ConfigTypeError,
    DataError,
    DataTypeError,
    FalconPruneError,
    MissingFileError,
    OutputExistsError,
    TrainingDiverged,
)
from falcon_prune.evaluation import evaluate
from falcon_prune.ilp import CostGroups
from falcon_prune.masks import clone_model, make_permanent, masks_of
from falcon_prune.oneshot import (
    check_model,
    check_prunable,
    check_task,
    float32_samples,
    working_copy,
)
from falcon_prune.recount import recount
from falcon_prune.results import write_rows
from falcon_prune.schedules import Schedule, as_schedule, stage_budgets
from falcon_prune.structure import remove_channels
from falcon_prune.tasks import Task, batch_mean, metric_key

CHECKPOINT_NAME = "gradual.pt"
OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer, int], object]
#: DataLoader options ``gradual`` keeps from a user's loader (besides dataset, batch size
#: and drop_last); its sampler, shuffle and generator are replaced by the seeded shuffling
LOADER_OPTIONS = ("collate_fn", "num_workers", "worker_init_fn", "multiprocessing_context",
                  "prefetch_factor", "pin_memory", "timeout")


@dataclass(frozen=True)
class GradualConfig:
    """Every setting of a gradual run: the budget ``schedule`` (default 5 cubic stages),
    ``epochs_per_stage`` fine-tuning epochs after each pruning step and ``final_epochs`` at
    the target, ``batch_size``, the default optimizer's ``lr``, ``momentum`` and
    ``weight_decay`` (SGD, cosine LR per epoch), ``bn_batches`` training batches that
    BatchNorm statistics are re-estimated on after each step, and ``step``: the
    :class:`~falcon_prune.PruneConfig` of every pruning step (method, gradients, held-out
    samples, solver, floors, task, seed, device)."""

    step: PruneConfig
    schedule: Schedule = Schedule(5, "cubic")
    epochs_per_stage: int = 1
    final_epochs: int = 2
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    bn_batches: int = 20

    def replace(self, **changes: Any) -> GradualConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["step"] = self.step.to_dict()
        out["schedule"] = {k: list(v) if isinstance(v, tuple) else v
                           for k, v in dataclasses.asdict(self.schedule).items()}
        return out


OWN = ("schedule", "stages", "epochs_per_stage", "final_epochs", "batch_size", "lr",
       "momentum", "weight_decay", "bn_batches")
NOT_IN_GRADUAL = {"recalibrate_bn": "gradual re-estimates BatchNorm statistics after every "
                                    "step (bn_batches)",
                  "sampling": "each step draws a seeded random subset of train_data"}


def gradual_defaults(method: str = "falcon", structure: str = "weights") -> GradualConfig:
    """The default :class:`GradualConfig` of ``method`` (any single-stage method) and
    ``structure``; its steps use 500 gradients and 500 held-out samples."""
    if method == "falcon++":
        raise ConfigError("falcon++ is multi-stage one-shot pruning; gradual's steps use a "
                          "single-stage method (e.g. method='falcon')")
    step = defaults(method, structure)
    if method in GRADIENT_METHODS:
        step = step.replace(n_gradients=500)
    if step.n_validation is not None:
        step = step.replace(n_validation=500)
    return GradualConfig(step=step)


def _gradual_schedule(base: Schedule, own: dict) -> Schedule:
    stages = own.get("stages")
    if "schedule" not in own:
        if stages is None:
            return base
        if base.levels is not None:
            raise ConfigError("stages disagrees with the explicit levels of the schedule")
        return dataclasses.replace(base, stages=stages)
    value = own["schedule"]
    if not isinstance(value, (Schedule, str, list, tuple)):
        raise ConfigTypeError(f"schedule must be a Schedule, a shape name or a list of kept "
                              f"fractions, got {value!r}")
    return as_schedule(value, stages)


def resolve_gradual(method: str | None, config: GradualConfig | None, settings: dict
                    ) -> GradualConfig:
    """The run's GradualConfig: ``config`` (or the method's gradual defaults) with the
    keyword ``settings`` applied (gradual's own and the steps'), every one validated."""
    if config is not None and not isinstance(config, GradualConfig):
        raise ConfigTypeError(f"config must be a falcon_prune.gradual.GradualConfig, got "
                              f"{config!r}")
    method = method if method is not None else (config.step.method if config else "falcon")
    structure = settings.get("structure") or "weights"
    base = config if config is not None else gradual_defaults(method, structure)
    if config is not None and config.step.method != method:
        raise ConfigError(f"method={method!r} but config.step.method={config.step.method!r}")
    settings = {k: v for k, v in settings.items() if v is not None}
    for k in settings:
        if k in NOT_IN_GRADUAL:
            raise ConfigError(f"gradual does not take {k}: {NOT_IN_GRADUAL[k]}")
    own = {k: settings.pop(k) for k in OWN if k in settings}
    gradual_defaults(method)  # refuses falcon++
    step, _ = resolve(method, base.step, settings)
    out = base.replace(step=step, schedule=_gradual_schedule(base.schedule, own),
                       **{k: v for k, v in own.items() if k not in ("schedule", "stages")})
    for name, low in (("epochs_per_stage", 0), ("final_epochs", 0), ("batch_size", 1),
                      ("bn_batches", 0)):
        v = getattr(out, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {v!r}")
    for name, ok in (("lr", lambda v: v > 0), ("momentum", lambda v: v >= 0),
                     ("weight_decay", lambda v: v >= 0)):
        v = getattr(out, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v):
            raise ConfigError(f"{name} has a bad value {v!r}")
    return out


@dataclass
class GradualResult:
    """What ``gradual`` returns: the pruned, fine-tuned ``model`` (masks attached), the
    ``config`` used, its kept fractions (recounted), the ``history`` (one row per pruning
    step and per epoch) and seconds per phase."""

    model: nn.Module
    config: GradualConfig
    flops_budget: float | None
    nnz_budget: float | None
    flops_fraction: float
    nnz_fraction: float
    history: list[dict]
    times: dict[str, float] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.config.step.method

    def write_history(self, path: str | Path) -> Path:
        """The history as CSV or JSON (by suffix)."""
        return write_rows(self.history, path)


def default_optimizer(lr: float, momentum: float, weight_decay: float) -> OptimizerFactory:
    """SGD with momentum (the default of ``gradual``)."""
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum,
                                          weight_decay=weight_decay)


def cosine_schedule(optimizer: torch.optim.Optimizer, total_epochs: int):
    """Cosine decay of the LR over all epochs of the run, stepped once per epoch."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_epochs))


# -- training data ---------------------------------------------------------------------------
@dataclass
class Feed:
    """Where training batches come from: a map-style ``dataset``, shuffled by (seed, epoch)
    and cut into batches of ``batch_size`` samples by a DataLoader with the options
    ``loader_kw`` kept from the user's loader (collate_fn, drop_last, workers)."""

    dataset: Dataset
    batch_size: int
    loader_kw: dict = field(default_factory=dict)

    def epoch(self, seed: int, epoch: int, ranks: Ranks | None = None) -> DataLoader:
        """The epoch's batches; with several ``ranks``, this rank's share of the epoch's
        seeded order (a ``DistributedSampler``), in batches of ``batch_size`` per rank."""
        if ranks is None or not ranks.active:
            return seeded_loader(self.dataset, self.batch_size, seed, epoch, **self.loader_kw)
        sampler = DistributedSampler(self.dataset, ranks.world, ranks.rank, shuffle=True,
                                     seed=seed * 1_000_003)
        sampler.set_epoch(epoch)
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler,
                          **self.loader_kw)

    @property
    def collate(self) -> Callable:
        return self.loader_kw.get("collate_fn") or default_collate

    def samples(self, n: int, seed: int) -> Samples:
        """``n`` samples: a seeded random subset, collated together by the collate_fn."""
        carrier = DataLoader(self.dataset, batch_size=1, collate_fn=self.collate)
        return collect(carrier, n, seed, "random").samples


def as_feed(data: object, batch_size: int) -> Feed:
    """A Feed from tensors, a map-style Dataset or a DataLoader over one."""
    if isinstance(data, DataLoader):
        return _feed_of_loader(data, batch_size)
    if (isinstance(data, (tuple, list)) and data
            and all(isinstance(t, torch.Tensor) for t in data)):
        if len({len(t) for t in data}) > 1:
            raise DataError(f"train_data tensors differ in length: {[len(t) for t in data]}")
        return Feed(TensorDataset(*data), batch_size)
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset) \
            and hasattr(data, "__len__"):
        return Feed(data, batch_size)
    raise DataTypeError(
        "train_data must be an (inputs, targets) tuple of tensors, a map-style Dataset or a "
        f"DataLoader over one (gradual shuffles by index); got {type(data).__name__}")


def _feed_of_loader(loader: DataLoader, batch_size: int) -> Feed:
    """The dataset, batch size, drop_last and LOADER_OPTIONS of ``loader``; a sampler other
    than a plain Random/SequentialSampler is replaced with a warning."""
    if isinstance(loader.dataset, IterableDataset) or not hasattr(loader.dataset, "__len__"):
        raise DataTypeError(
            "train_data is a DataLoader over an iterable-style dataset; gradual shuffles by "
            "index with a seeded order (so that resume works) and needs a map-style Dataset "
            "with __len__ and __getitem__: pass a DataLoader over one")
    bs = loader.batch_sampler
    if bs is None:
        raise ConfigError(
            "train_data is a DataLoader with batch_size=None (no batching); give it a "
            "batch_size, or pass its dataset and batch_size=...")
    plain = type(bs) is BatchSampler
    custom = _custom_sampler(bs)
    if custom is not None:
        warnings.warn(
            f"train_data's DataLoader uses {custom}; gradual replaces it by its own seeded "
            "shuffling (the data order depends only on seed and epoch, so that a resumed run "
            f"repeats it) in batches of {bs.batch_size if plain else batch_size} samples; pass "
            "a DataLoader with shuffle=True/False (or the dataset) to silence this",
            UserWarning, stacklevel=5)
    kw = {k: getattr(loader, k) for k in LOADER_OPTIONS}
    kw["drop_last"] = bs.drop_last if plain else False
    return Feed(loader.dataset, bs.batch_size if plain else batch_size, kw)


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


def seeded_loader(dataset: Dataset, batch_size: int, seed: int, epoch: int,
                  **loader_kw) -> DataLoader:
    """Batches of ``dataset`` in an order that depends only on (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=g, **loader_kw)


def device_of(model: nn.Module) -> torch.device:
    """Where the model's parameters live (batches are moved there); CPU without any."""
    return next((q.device for q in model.parameters()), torch.device("cpu"))


def recalibrate_on(model: nn.Module, feed: Feed, batches: int, seed: int, task: Task) -> None:
    """Re-estimate BatchNorm running statistics on ``batches`` seeded training batches
    (:func:`falcon_prune.batchnorm.recalibrate_batchnorm`; no gradient step). No-op for
    models without BatchNorm or with ``batches`` <= 0."""
    if batches <= 0:
        return
    loader = seeded_loader(feed.dataset, feed.batch_size, seed, -1, **feed.loader_kw)
    recalibrate_batchnorm(model, (task.inputs(b) for b in islice(loader, batches)),
                          device_of(model), call=task.call)


# -- masks and steps -------------------------------------------------------------------------
def _holders(model: nn.Module, cm: CostModel, suffix: str = ""
             ) -> list[list[tuple[nn.Module, str]]]:
    """Per prunable parameter of ``cm`` (by name), every (module, attribute) of ``model``
    that holds it (a tied parameter has several). With ``suffix="_orig"``: the holders of
    a masked model's ``<attribute>_orig`` parameters, named without the suffix."""
    found = parameter_holders(model)
    by_name = {n: holders for holders in found.values() for n, _, _ in holders}
    return [[(m, a.removesuffix(suffix)) for _, m, a in by_name[lay.name + suffix]]
            for lay in cm.layers]


def _attach_masks(model: nn.Module, cm: CostModel) -> None:
    """Give every prunable parameter a ``torch.nn.utils.prune`` mask (its non-zero
    pattern), so that the parameters (``<name>_orig``) stay the same objects all run long
    and tied ones stay tied."""
    for holders in _holders(model, cm):
        module, attr = holders[0]
        mask = getattr(module, attr).detach() != 0
        for module, attr in holders:
            torch_prune.custom_from_mask(module, attr, mask)


def _write_back(model: nn.Module, cm: CostModel, w: torch.Tensor, mask: torch.Tensor) -> None:
    """Copy a step's flat weights/mask into the masked training model, in place."""
    with torch.no_grad():
        for wl, ml, holders in zip(cm.split(w), cm.split(mask), _holders(model, cm, "_orig"),
                                   strict=True):
            for module, attr in holders:
                orig, keep = getattr(module, attr + "_orig"), getattr(module, attr + "_mask")
                orig.copy_(wl.to(orig.dtype))
                keep.copy_(ml.to(keep.dtype))



def _kept_fractions(model: nn.Module, cm: CostModel, structure: str = "weights"
                    ) -> tuple[float, float]:
    """(FLOPs, NNZ) kept by the masks: NNZ of the prunable weights, or with
    structure='channels' of all parameters (what the smaller network will hold)."""
    modules = dict(model.named_modules())
    kept = torch.tensor([float(model.get_buffer(lay.name + "_mask").sum())
                         for lay in cm.layers], dtype=torch.float64)
    macs = float((kept * cm.layer_costs()).sum())
    if structure != "channels":
        return macs / cm.dense_macs, float(kept.sum()) / cm.num_weights
    params = total = 0
    for name, p in model.named_parameters():
        mname, _, pname = name.rpartition(".")
        mask = getattr(modules[mname], pname.removesuffix("_orig") + "_mask", None)
        params += int(mask.sum()) if mask is not None and pname.endswith("_orig") \
            else p.numel()
        total += p.numel()
    return macs / cm.dense_macs, params / total


@dataclass
class _Run:
    """What the events of one gradual run share."""

    work: nn.Module
    cm: CostModel
    groups: CostGroups
    feed: Feed
    probe: object
    recount_inputs: object
    problem: Problem
    config: GradualConfig
    need: int


def _prune_step(run: _Run, f_k: float | None, s_k: float | None, seed: int) -> dict:
    """Prune the masked training model in place to the stage budgets (never reviving)."""
    cfg = run.config.step
    plain, _ = working_copy(run.work, run.problem.device)  # float32 for half models
    cm_plain = CostModel.from_model(plain, run.probe, run.problem.task.call, cfg.include,
                                    cfg.exclude)
    masks = masks_of(run.work)
    allowed = torch.cat([masks[lay.name].reshape(-1) for lay in run.cm.layers])
    samples = float32_samples(run.feed.samples(min(run.need, len(run.feed.dataset)), seed))
    require_same_samples(run.problem.ranks, leaves(samples.batch))
    n_fit = cfg.n_gradients if cfg.method in GRADIENT_METHODS else 0
    fit, held = samples.take(slice(0, n_fit)), samples.take(slice(n_fit, len(samples)))
    row = {"flops_budget": f_k, "nnz_budget": s_k}
    if cfg.structure == "channels":
        state = UnitState.build(plain, cm_plain, run.probe, run.problem.task, cfg)
        state.alive = state.alive_from_weights(cm_plain, allowed)
        step = solve_unit_step(plain, cm_plain, state, state.budget(cm_plain, f_k, s_k), fit,
                               held, run.problem)
        _mask_params(run.work, state.alive_params(step.keep), state.overrides(step.keep))
        row["units_kept"] = int(step.keep.sum())
    else:
        step = solve_step(plain, cm_plain, run.groups, budget_of(run.cm, f_k, s_k, cfg), fit,
                          held, run.problem, allowed)
    _write_back(run.work, run.cm, step.w, step.mask)
    recalibrate_on(run.work, run.feed, run.config.bn_batches, seed, run.problem.task)
    return row


def _attach_param_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Give the non-weight parameters of channel units (biases, norms) masks, all kept."""
    modules = dict(model.named_modules())
    for name, keep in masks.items():
        mname, _, pname = name.rpartition(".")
        if not hasattr(modules[mname], pname + "_mask"):
            torch_prune.custom_from_mask(modules[mname], pname, torch.ones_like(keep))


def _mask_params(model: nn.Module, alive: dict[str, torch.Tensor],
                 values: dict[str, torch.Tensor]) -> None:
    """Mask (``torch.nn.utils.prune``) the non-weight parameters of dead channels (biases,
    norms) in the training model, so fine-tuning keeps them at zero."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, keep in alive.items():
            mname, _, pname = name.rpartition(".")
            module = modules[mname]
            if not hasattr(module, pname + "_mask"):
                torch_prune.custom_from_mask(module, pname, torch.ones_like(keep))
            getattr(module, pname + "_orig").copy_(values[name].to(module.weight.device))
            getattr(module, pname + "_mask").copy_(keep.to(getattr(module, pname + "_mask")))


def _train_epoch(model: nn.Module, opt, feed: Feed, seed: int, epoch: int, task: Task,
                 ranks: Ranks) -> float:
    """One epoch of optimizer steps over ``feed``; the mean training loss per sample (over
    every rank's samples). ``model`` is the training model or its DistributedDataParallel
    wrapper, which averages the gradients over the ranks."""
    model.train()
    total, count = 0.0, 0
    dev = device_of(model)
    for batch in feed.epoch(seed, epoch, ranks):
        pred, targets = task.run(model, to_device(batch, dev))
        opt.zero_grad(set_to_none=True)
        loss = batch_mean(task.losses(pred, targets))
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                "the training loss became NaN/inf; lower the learning rate (lr=...)")
        loss.backward()
        opt.step()
        total += loss.item() * pred.shape[0]
        count += pred.shape[0]
    if ranks.active:
        total, count = ranks.all_sum(torch.tensor([total, count], dtype=torch.float64)).tolist()
    return total / max(1, count)


# -- checkpoints -----------------------------------------------------------------------------
def _run_record(config: GradualConfig, feed: Feed, optimizer, lr_scheduler, levels) -> dict:
    """Every setting that changes the result of a run, as plain values (a checkpoint refuses
    to resume under others); custom optimizer, LR schedule and collate_fn only as 'custom'."""
    record = config.to_dict()
    if optimizer is not None:
        for k in ("lr", "momentum", "weight_decay"):
            record.pop(k)
    record.update(
        optimizer="sgd" if optimizer is None else "custom",
        lr_scheduler="cosine" if lr_scheduler is None else "custom",
        levels=[list(b) for b in levels], n_train=len(feed.dataset),
        batch_size=feed.batch_size, drop_last=feed.loader_kw.get("drop_last", False),
        collate_fn="default" if feed.loader_kw.get("collate_fn") in (None, default_collate)
        else "custom")
    return record


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(path: Path, record: dict, next_event: int, model, opt, lrs,
                    history) -> None:
    """The full state after an event; written atomically."""
    state = {"config": record, "next_event": next_event, "model": model.state_dict(),
             "optimizer": opt.state_dict(), "lr_scheduler": lrs.state_dict(),
             "rng": _rng_state(), "history": history}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # an interruption never leaves half a checkpoint


def read_gradual_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise MissingFileError(f"resume=True but there is no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile,
            ValueError, AttributeError, ImportError) as e:
        raise CheckpointError(
            f"{path} cannot be read ({type(e).__name__}: {e}); it is corrupt or truncated. "
            "Delete it to start afresh, or use another checkpoint_dir") from e
    keys = {"config", "next_event", "model", "optimizer", "lr_scheduler", "rng", "history"}
    if not isinstance(state, dict) or not keys <= set(state):
        raise CheckpointError(f"{path} is not a checkpoint of falcon_prune.gradual (it lacks "
                              f"{sorted(keys - set(state)) if isinstance(state, dict) else keys})")
    return state


def load_checkpoint(path: Path, record: dict, model, opt, lrs) -> tuple[int, list[dict]]:
    """Restore a run's state (model, optimizer, LR schedule, RNG) from ``path`` after
    checking that it was saved under the same settings."""
    state = read_gradual_checkpoint(path)
    saved = state["config"]
    if saved != record:
        absent = "<not set>"
        diff = {k: (saved.get(k, absent), record.get(k, absent))
                for k in sorted(saved.keys() | record.keys())
                if saved.get(k, absent) != record.get(k, absent)}
        raise CheckpointError(
            f"{path} belongs to a run with other settings {diff} (saved, now); resume with "
            "the same arguments or use another checkpoint_dir")
    try:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        lrs.load_state_dict(state["lr_scheduler"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path} does not fit this model or optimizer ({e})") from e
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["next_event"], state["history"]


def _resumed(path: Path, record: dict, model, opt, lrs, ranks: Ranks) -> tuple[int, list]:
    """:func:`load_checkpoint` on every rank, which must all read it and stand at the same
    event: a ``checkpoint_dir`` that some rank's machine does not see stops every rank."""
    try:
        (start, history), failure = load_checkpoint(path, record, model, opt, lrs), None
    except FalconPruneError as e:
        (start, history), failure = (-1, []), e
    ranks.raise_together(failure, CheckpointError(
        f"another process could not resume from {path} (its message says why); "
        "checkpoint_dir must be a directory that every rank sees"))
    if not ranks.same(start):
        raise CheckpointError(
            f"the processes read checkpoints at different events from {path}; "
            "checkpoint_dir must be one directory that every rank sees")
    return start, history


def _check_scheduler(lrs: object, checkpointing: bool) -> None:
    """The LR schedule must step; with checkpoints it must also save and restore its state."""
    name = type(lrs).__name__
    if not callable(getattr(lrs, "step", None)):
        raise ConfigTypeError(
            f"lr_scheduler(optimizer, total_epochs) returned a {name} without step(); return "
            "a torch.optim.lr_scheduler object (or one with step())")
    if checkpointing and not all(callable(getattr(lrs, m, None))
                                 for m in ("state_dict", "load_state_dict")):
        raise ConfigTypeError(
            f"the lr_scheduler ({name}) has no state_dict()/load_state_dict(), so a checkpoint "
            "could not save its position and a resumed run would restart its schedule; with "
            "checkpoint_dir the scheduler must provide state_dict and load_state_dict (every "
            "torch.optim.lr_scheduler does), or run without checkpoint_dir")


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
    extra = {}
    if step.structure == "channels":
        state = UnitState.build(plain, cm, probe, step.task, step)
        state.check(cm, state.budget(cm, flops, nnz), step.round_to)
        extra = state.alive_params(state.alive)  # masks from the start: resume needs them
    else:
        check_floors(cm, budget_of(cm, flops, nnz, step), step)
    grads = step.method in GRADIENT_METHODS
    if grads and len(feed.dataset) < step.n_gradients:
        raise DataError(f"n_gradients={step.n_gradients} but train_data has "
                        f"{len(feed.dataset)} samples; lower it")
    _attach_masks(work, cm)
    _attach_param_masks(work, extra)
    groups = CostGroups.from_layers(cm.layer_costs(), cm.layer_sizes(), device=device)
    need = (step.n_gradients if grads else 1) + (step.n_validation or 0)
    problem = Problem(step, step.task, device, ranks=Ranks.current())
    require_same_model(problem.ranks, work)
    return _Run(work, cm, groups, feed, probe, raw, problem, config, need)


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
        row = {"train_loss": _train_epoch(net, opt, run.feed, seed, i, run.problem.task,
                                          run.problem.ranks),
               "lr": opt.param_groups[0]["lr"]}
        lrs.step()
    row = {"event": i + 1,
           "phase": kind if kind == "prune" else ("final" if k > len(plan) else "finetune"),
           "stage": min(k, len(plan)), "epoch": e, **row}
    row["flops_fraction"], row["nnz_fraction"] = _kept_fractions(
        run.work, run.cm, run.config.step.structure)
    if eval_data is not None:
        ev = evaluate(run.work, eval_data, run.problem.task)
        row["eval_loss"] = ev.loss
        if ev.metric is not None:
            row[metric_key("eval", run.problem.task)] = ev.metric
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
    if total_epochs == 0:
        raise ConfigError("epochs_per_stage and final_epochs are both 0: there is no "
                          "fine-tuning; use falcon_prune.prune for one-shot pruning")
    if resume and checkpoint_dir is None:
        raise ConfigError("resume=True needs the checkpoint_dir of the interrupted run")
    ckpt = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    if ckpt is not None and not resume and Ranks.current().any(ckpt.exists()):
        raise OutputExistsError(
            f"{ckpt} exists: pass resume=True to continue that run, or another checkpoint_dir")
    dev = torch.device(cfg.step.device)
    with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
        return _gradual(model, train_data, flops, nnz, cfg, plan, total_epochs, eval_data,
                        optimizer, lr_scheduler, ckpt, resume, callback, progress)


def _gradual(model, train_data, flops, nnz, cfg: GradualConfig, plan, total_epochs,
             eval_data, optimizer, lr_scheduler, ckpt: Path | None, resume: bool, callback,
             progress: bool) -> GradualResult:
    t_start = time.perf_counter()
    run = _setup(model, train_data, flops, nnz, cfg)
    ranks = run.problem.ranks
    progress = progress and ranks.is_main
    net = data_parallel(run.work, ranks)
    opt = (optimizer or default_optimizer(cfg.lr, cfg.momentum, cfg.weight_decay))(
        list(run.work.parameters()))
    lrs = (lr_scheduler or cosine_schedule)(opt, total_epochs)
    _check_scheduler(lrs, checkpointing=ckpt is not None)
    record = _run_record(cfg, run.feed, optimizer, lr_scheduler, plan)
    events = _events(len(plan), cfg.epochs_per_stage, cfg.final_epochs)
    start, history = 0, []
    if resume:
        start, history = _resumed(ckpt, record, run.work, opt, lrs, ranks)
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
    if cfg.step.structure == "channels":
        flops_kept, nnz_kept = _remove_dead_channels(run, flops, nnz)
    else:
        final = budget_of(run.cm, flops, nnz, cfg.step)
        flops_kept, nnz_kept, _ = verify(run.work, run.cm, final, cfg.step.task,
                                         run.recount_inputs,
                                         (cfg.step.include, cfg.step.exclude))
    times["total"] = time.perf_counter() - t_start
    # the config as run: 'auto' precisions decided for this model and device
    return GradualResult(run.work, run.config, flops, nnz, flops_kept, nnz_kept, history,
                         times)


def data_parallel(model: nn.Module, ranks: Ranks) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel when there are several ranks (its
    parameters are then the same on every rank, and gradients are averaged), else itself."""
    if not ranks.active:
        return model
    dev = device_of(model)
    return DistributedDataParallel(model, device_ids=[dev] if dev.type == "cuda" else None)


def _remove_dead_channels(run: _Run, flops: float | None, nnz: float | None
                          ) -> tuple[float, float]:
    """structure='channels': fold the masks, remove the dead channels physically, and
    check the smaller network against the budgets (recount and parameter count)."""
    work, task = run.work, run.problem.task
    make_permanent(work)
    total = sum(p.numel() for p in work.parameters())
    step = run.config.step
    cm = CostModel.from_model(work, run.probe, task.call, step.include, step.exclude)
    state = UnitState.build(work, cm, run.probe, task, run.config.step)
    state.alive = state.alive_from_weights(cm, flatten_weights(cm) != 0)
    remove_channels(state.units, state.alive)
    count = recount(work, run.recount_inputs, task.call, {e.name for e in cm.excluded},
                    step.include, step.exclude)
    params = sum(p.numel() for p in work.parameters())
    if (flops is not None and count.dense > flops * cm.dense_macs * (1 + 1e-12)) or (
            nnz is not None and params > math.floor(nnz * total + 1e-9)):
        raise BudgetViolation(f"internal error: gradual ended with {count.dense:,.0f} MACs "
                              f"and {params:,} parameters, over the budgets; please report")
    return count.dense / cm.dense_macs, params / total
