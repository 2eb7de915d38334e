"""Fine-tuning for ``gradual``: where training batches come from (:class:`Feed`, a seeded
order that depends only on (seed, epoch), so that a resumed run repeats it), one epoch of
optimizer steps, BatchNorm re-estimation on training batches, the default optimizer and
LR schedule, and DistributedDataParallel under ``torchrun``."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
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

from falcon_prune.analysis.batchnorm import recalibrate_batchnorm
from falcon_prune.data.batches import Samples, collect, default_collate, to_device
from falcon_prune.data.tasks import Task, batch_mean
from falcon_prune.errors import ConfigError, DataError, DataTypeError, TrainingDiverged
from falcon_prune.loss.distributed import Ranks

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer, int], object]
#: DataLoader options ``gradual`` keeps from a user's loader (besides dataset, batch size
#: and drop_last); its sampler, shuffle and generator are replaced by the seeded shuffling
LOADER_OPTIONS = ("collate_fn", "num_workers", "worker_init_fn", "multiprocessing_context",
                  "prefetch_factor", "pin_memory", "timeout")


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


def train_epoch(model: nn.Module, opt, feed: Feed, seed: int, epoch: int, task: Task,
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


def data_parallel(model: nn.Module, ranks: Ranks) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel when there are several ranks (its
    parameters are then the same on every rank, and gradients are averaged), else itself."""
    if not ranks.active:
        return model
    dev = device_of(model)
    return DistributedDataParallel(model, device_ids=[dev] if dev.type == "cuda" else None)
