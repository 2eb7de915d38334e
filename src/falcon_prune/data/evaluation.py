"""One evaluator: the mean loss and metric of a model on data, streamed batch by batch.

:func:`evaluate_batches` is the loop every evaluation in the package goes through (the
public :func:`evaluate`, the held-out scores of pruning candidates, gradual's evaluation
rows); :func:`evaluate` streams any form of data through it without gathering the data
set into memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from falcon_prune.data.batches import (
    Batch,
    chunks,
    default_collate,
    is_sample_list,
    is_whole_batch,
    to_device,
)
from falcon_prune.data.tasks import Task, as_task, batch_sum
from falcon_prune.errors import DataError, DataTypeError


@dataclass(frozen=True)
class Evaluation:
    """Mean ``loss`` per sample, the task's mean ``metric`` (None when the task has none)
    named ``metric_name``, over ``samples`` samples."""

    loss: float
    metric: float | None
    metric_name: str | None
    samples: int


def evaluate_batches(run: Callable[[Batch], tuple[torch.Tensor, Any]], batches: Iterable[Batch],
                     task: Task, check: bool = False) -> Evaluation:
    """Mean loss and metric of ``run(batch) -> (prediction, targets)`` over ``batches``;
    with ``check``, the task's check runs on every batch first (clear errors for labels
    out of range and the like)."""
    loss, metric, n = 0.0, 0.0, 0
    for batch in batches:
        pred, targets = run(batch)
        k = int(pred.shape[0])
        if check and task.check is not None:
            task.check(pred, targets)
        loss += float(batch_sum(task.losses(pred, targets).double(), k))
        if task.metric is not None:
            metric += float(task.metric(pred, targets).double().sum())
        n += k
    if n == 0:
        raise DataError("there are no samples to evaluate on")
    return Evaluation(loss / n, metric / n if task.metric is not None else None,
                      task.metric_name, n)


def stream(data: object, batch_size: int = 256) -> Iterator[Batch]:
    """Batches of ``data`` (tensors, a Dataset, a list of samples, a DataLoader or an
    iterable of batches), read as they are needed."""
    if is_whole_batch(data):
        yield from chunks(data, batch_size)
    elif isinstance(data, DataLoader):
        yield from data
    elif (isinstance(data, Dataset) and not isinstance(data, IterableDataset)) \
            or is_sample_list(data):
        yield from DataLoader(data, batch_size=batch_size, collate_fn=default_collate)
    elif isinstance(data, Iterable) and not isinstance(data, (str, bytes)):
        yield from data
    else:
        raise DataTypeError(
            "data must be tensors, a Dataset, a list of samples, a DataLoader or an iterable "
            f"of batches; got {type(data).__name__}")


def evaluate(model: nn.Module, data: object, task: Task | str | None = None,
             batch_size: int = 256, device: str | torch.device | None = None) -> Evaluation:
    """Mean loss and metric (e.g. top-1 accuracy) of ``model`` in eval mode on ``data``,
    streamed in batches of ``batch_size`` (a DataLoader keeps its own), on ``device``
    (default: where the model's parameters are). The model's mode is restored."""
    task = as_task(task)
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return evaluate_batches(lambda b: task.run(model, to_device(b, device)),
                                    stream(data, batch_size), task, check=True)
    finally:
        model.train(was)


def accuracy(model: nn.Module, data: object, batch_size: int = 256,
             device: str | torch.device | None = None) -> float:
    """Top-1 accuracy of a classifier on ``data`` (:func:`evaluate` with the default
    classification task)."""
    return float(evaluate(model, data, None, batch_size, device).metric)
