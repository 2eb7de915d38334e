"""Batches of any structure, and the samples a pruning run draws from the user's data.

A *batch* is a tensor, or a tuple, list or mapping (a dict, a HuggingFace ``BatchEncoding``)
of tensors, nested to any depth, whose tensors share their first (batch) dimension; other
leaves (None, strings, numbers) are carried along unchanged. Mappings come back as plain
dicts, which every ``model(**inputs)`` accepts.

:func:`collect` draws the samples one run uses from any form of data, by ``seed`` and
``sampling``, into one in-memory batch (:class:`Samples`); only the samples drawn are held,
never the whole data set.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torch.utils.data import default_collate as torch_default_collate

from falcon_prune.errors import ConfigError, DataError, DataTypeError

Batch = Any
SAMPLINGS = ("random", "first")


# -- structure -------------------------------------------------------------------------------
def map_tensors(batch: Batch, fn: Callable[[torch.Tensor], Any]) -> Batch:
    """The batch with every tensor leaf replaced by ``fn(leaf)``, in a fixed leaf order."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {k: map_tensors(v, fn) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(map_tensors(v, fn) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_tensors(v, fn) for v in batch)
    return batch


def leaves(batch: Batch) -> list[torch.Tensor]:
    """The tensor leaves of ``batch`` in :func:`map_tensors` order."""
    out: list[torch.Tensor] = []
    map_tensors(batch, out.append)
    return out


def rebuild(template: Batch, tensors: Sequence[torch.Tensor]) -> Batch:
    """``template`` with its tensor leaves replaced, in order, by ``tensors``."""
    it = iter(tensors)
    return map_tensors(template, lambda _: next(it))


def batch_size(batch: Batch) -> int:
    """The first dimension shared by every tensor leaf; DataError when they disagree."""
    sizes = {tuple(t.shape[:1]) for t in leaves(batch)}
    if not sizes:
        raise DataError("a batch holds no tensor; it must hold at least the model's inputs")
    if () in sizes:
        raise DataError("a batch holds a 0-d tensor; every tensor needs a batch dimension")
    if len(sizes) > 1:
        raise DataError(
            f"the tensors of a batch differ in their first (batch) dimension: "
            f"{sorted(s[0] for s in sizes)}; inputs and targets must have one row per sample"
        )
    return next(iter(sizes))[0]


def take(batch: Batch, index: torch.Tensor | slice) -> Batch:
    """The samples ``index`` (an index tensor or a slice) of every tensor leaf."""
    if isinstance(index, slice):
        return map_tensors(batch, lambda t: t[index])
    return map_tensors(batch, lambda t: t[index.to(t.device)])


def to_device(batch: Batch, device: torch.device | str) -> Batch:
    return map_tensors(batch, lambda t: t.to(device))


def _like(batch: Batch, ref: Batch) -> Batch:
    """``batch`` with its mappings' keys in the order of ``ref``'s (DataError if the keys
    differ), so that leaves pair up by key, not by position."""
    if isinstance(ref, Mapping):
        if not isinstance(batch, Mapping) or set(batch) != set(ref):
            got = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise DataError(f"the batches differ in structure: keys {sorted(ref)} and {got}")
        return {k: _like(batch[k], ref[k]) for k in ref}
    if isinstance(ref, (tuple, list)) and isinstance(batch, (tuple, list)) \
            and len(ref) == len(batch):
        return [_like(b, r) for b, r in zip(batch, ref, strict=True)]
    return batch


def concat(batches: Sequence[Batch]) -> Batch:
    """One batch from several of the same structure (tensors concatenated on dim 0;
    mapping entries paired by key)."""
    parts = [leaves(_like(b, batches[0])) for b in batches]
    if any(len(p) != len(parts[0]) for p in parts):
        raise DataError("the batches differ in structure (some hold more tensors than others)")
    out = []
    for k, group in enumerate(zip(*parts, strict=True)):
        shapes = {tuple(t.shape[1:]) for t in group}
        if len(shapes) > 1:
            raise DataError(
                f"tensor {k} of the batches differs in shape beyond the batch dimension "
                f"({sorted(shapes)[:3]}); pad every batch to one length (e.g. a collator with "
                "padding='max_length') or pass a Dataset so the samples are collated together"
            )
        out.append(torch.cat(group))
    return rebuild(batches[0], out)


def chunks(batch: Batch, size: int) -> Iterator[Batch]:
    """Consecutive sub-batches of at most ``size`` samples."""
    n = batch_size(batch)
    for a in range(0, n, size):
        yield take(batch, slice(a, min(n, a + size)))


# -- samples ---------------------------------------------------------------------------------
@dataclass
class Samples:
    """Samples held in memory as one batch (CPU tensors) whose rows are the samples."""

    batch: Batch

    def __len__(self) -> int:
        return batch_size(self.batch)

    def take(self, index: torch.Tensor | slice) -> Samples:
        return Samples(take(self.batch, index))

    def chunks(self, size: int) -> Iterator[Batch]:
        return chunks(self.batch, size)


@dataclass(frozen=True)
class Drawn:
    """What :func:`collect` returns: the samples, the sampling actually used and the size
    of the data (None when a stream cannot tell)."""

    samples: Samples
    sampling: str
    total: int | None


def default_collate(items: list) -> Batch:
    """torch's ``default_collate``, with Python scalars as tensors."""
    return torch_default_collate(items)


def _is_scalar(v: object) -> bool:
    """A Python or numpy number, or a 0-d tensor or array."""
    if isinstance(v, numbers.Number):
        return True
    return isinstance(v, (torch.Tensor, np.ndarray)) and v.ndim == 0


def _target_of(item: object) -> object:
    if isinstance(item, Mapping):
        return item.get("labels", item.get("label"))
    if isinstance(item, (tuple, list)) and len(item) >= 2:
        return item[-1]
    return None


def is_whole_batch(data: object) -> bool:
    """Data given as tensors: a tensor, or a tuple/list/mapping of tensors only."""
    if isinstance(data, torch.Tensor):
        return True
    if isinstance(data, Mapping):
        return bool(data) and all(isinstance(v, torch.Tensor) for v in data.values())
    if isinstance(data, (tuple, list)):
        return bool(data) and all(isinstance(v, torch.Tensor) for v in data)
    return False


def is_sample_list(data: object) -> bool:
    """A list/tuple of samples (each item's target a scalar) rather than of batches."""
    return (isinstance(data, (tuple, list)) and len(data) > 0
            and _is_scalar(_target_of(data[0])))


def data_length(data: object) -> int | None:
    """Number of samples (not batches) in ``data``, or None when only reading tells."""
    if is_whole_batch(data):
        return batch_size(data)
    if isinstance(data, DataLoader):
        ds = data.dataset
        if isinstance(ds, IterableDataset) or not hasattr(ds, "__len__"):
            return None
        return len(ds)  # type: ignore[arg-type]
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        try:
            return len(data)  # type: ignore[arg-type]
        except TypeError:
            return None
    if is_sample_list(data):
        return len(data)  # type: ignore[arg-type]
    if isinstance(data, (tuple, list)):
        return sum(batch_size(b) for b in data)
    return None


def _order(total: int, want: int, sampling: str, seed: int) -> torch.Tensor:
    if sampling == "first":
        return torch.arange(min(want, total))
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(total, generator=g)[:want]


def _indexed(data: object) -> tuple[object, Callable[[list], Batch]] | None:
    """(random-access samples, collate function) when ``data`` allows random access."""
    if isinstance(data, DataLoader):
        ds = data.dataset
        if isinstance(ds, IterableDataset) or not hasattr(ds, "__len__"):
            return None
        if data.batch_sampler is None:  # no automatic batching: collate_fn converts one item
            convert = data.collate_fn
            return ds, lambda items: default_collate([convert(i) for i in items])
        return ds, data.collate_fn or default_collate
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        return (data, default_collate) if hasattr(data, "__len__") else None
    if is_sample_list(data):
        return data, default_collate
    return None


def _collate(collate: Callable[[list], Batch], items: list) -> Batch:
    try:
        return collate(items)
    except (TypeError, RuntimeError) as e:
        raise DataError(
            f"the samples could not be collated into a batch ({e}); every item must be a "
            "tensor, an (inputs, targets) pair or a dict of tensors of one shape, or pass a "
            "DataLoader whose collate_fn pads them"
        ) from e


def _stream(data: Iterable, want: int) -> Batch:
    got, have = [], 0
    for b in data:
        got.append(b)
        have += batch_size(b)
        if have >= want:
            break
    if not got:
        raise DataError("the data yielded no batches")
    return concat(got)


def collect(data: object, want: int, seed: int = 0, sampling: str | None = None,
            minimum: int = 1) -> Drawn:
    """Draw up to ``want`` samples (at least ``minimum``) from ``data``.

    ``data``: tensors (a tensor, or a tuple/list/dict of tensors of N rows), a map-style
    Dataset, a list of samples (items whose target is a scalar), a DataLoader (its dataset
    and collate_fn, when the dataset is map-style), a list of batches, or any iterable of
    batches. ``sampling`` 'random' draws a seeded random subset (``seed``), 'first' takes
    the first samples; None is 'random' where the data has random access and 'first' (the
    stream's order) for an iterator, which has none. Raises DataError for too few samples
    and DataTypeError for data of another form."""
    if sampling is not None and sampling not in SAMPLINGS:
        raise ConfigError(f"sampling must be one of {SAMPLINGS} or None, got {sampling!r}")
    indexed = _indexed(data)
    if is_whole_batch(data) or indexed is not None or isinstance(data, (tuple, list)):
        sampling = sampling or "random"
        if indexed is not None:
            ds, collate = indexed
            total = len(ds)  # type: ignore[arg-type]
            _check_count(total, minimum)
            idx = _order(total, want, sampling, seed)
            batch = _collate(collate, [ds[int(i)] for i in idx])  # type: ignore[index]
        else:
            whole = data if is_whole_batch(data) else concat(list(data))  # type: ignore[arg-type]
            total = batch_size(whole)
            _check_count(total, minimum)
            batch = take(whole, _order(total, want, sampling, seed))
        return Drawn(Samples(batch), sampling, total)
    if not isinstance(data, Iterable) or isinstance(data, (str, bytes)):
        raise DataTypeError(
            "data must be tensors ((inputs, targets), a tensor, or a dict of tensors), a "
            "Dataset, a list of samples, a DataLoader or an iterable of batches; got "
            f"{type(data).__name__}"
        )
    if sampling == "random":
        raise ConfigError(
            "sampling='random' needs random access, but the data is an iterator (or a "
            "DataLoader over an IterableDataset); pass a Dataset or a DataLoader over one, "
            "or sampling='first' to take the stream's first samples"
        )
    batch = _stream(data, want)
    _check_count(batch_size(batch), minimum)
    return Drawn(Samples(take(batch, slice(0, want))), "first", None)


def _check_count(total: int, minimum: int) -> None:
    if total < minimum:
        raise DataError(
            f"asked for {minimum} samples but the data has only {total}; lower n_gradients "
            "(or samples_per_gradient) or pass more data"
        )
