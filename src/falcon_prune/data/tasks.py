"""Tasks: how a batch goes through a model and what the loss of each sample is.

A :class:`Task` is used everywhere a model is run: per-sample gradients, the held-out
selection of hyperparameters, evaluation, BatchNorm re-estimation, gradual fine-tuning and
the command line. It has five parts, each a plain function:

- ``split(batch) -> (inputs, targets)``: by default a tuple/list ``(x, y)`` gives
  ``inputs=x``, ``targets=y`` (``(x1, ..., xk, y)``: inputs ``(x1, ..., xk)``); a mapping
  gives every key but ``labels``/``label`` as inputs and that key as targets; a tensor is
  inputs without targets.
- ``call(model, inputs) -> outputs``: ``model(x)`` for a tensor, ``model(*x)`` for a tuple,
  ``model(**x)`` for a mapping.
- ``output(outputs) -> prediction``: the tensor the loss reads. A tensor is itself; a
  mapping or HuggingFace ``ModelOutput`` gives its ``logits``; a tuple its first element.
- ``loss(prediction, targets) -> (N,)``: the loss of every sample (a 0-d result is taken
  as the batch mean).
- ``metric(prediction, targets) -> (N,)`` (optional): a score per sample, e.g. 1.0 for a
  correct top-1 prediction; reported as ``metric_name``.

``check(prediction, targets)`` (optional) raises a :class:`~falcon_prune.errors.DataError`
or :class:`~falcon_prune.errors.ModelError` with the fix when the model's output and the
targets cannot work with the loss; it runs before any expensive work, on a prediction for
a few samples and the targets of every sample drawn.

Built-in tasks: :func:`classification` (the default), :func:`binary_classification`,
:func:`regression`, :func:`language_modeling` and :func:`dense_prediction`. Losses and
metrics are computed in float32 for half-precision models.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from falcon_prune.data.batches import Batch
from falcon_prune.errors import ConfigError, ConfigTypeError, DataError, ModelError

LABEL_KEYS = ("labels", "label")


# -- the default parts -------------------------------------------------------------------
def split_batch(batch: Batch) -> tuple[Any, Any]:
    """(inputs, targets) of a batch by the conventions in the module doc."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        key = next((k for k in LABEL_KEYS if k in batch), None)
        inputs = {k: v for k, v in batch.items() if k != key}
        return inputs, (batch[key] if key is not None else None)
    if isinstance(batch, (tuple, list)):
        if len(batch) == 1:
            return batch[0], None
        if len(batch) == 2:
            return batch[0], batch[1]
        return tuple(batch[:-1]), batch[-1]
    raise DataError(
        f"a batch must be a tensor, a tuple (inputs, targets) or a dict of tensors; got "
        f"{type(batch).__name__}"
    )


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(x)``, ``model(*x)`` or ``model(**x)`` by the type of ``inputs``."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def logits_of(outputs: Any) -> torch.Tensor:
    """The prediction tensor of a model's outputs (see the module doc)."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping):
        if "logits" in outputs:
            return outputs["logits"]
        tensors = [k for k, v in outputs.items() if isinstance(v, torch.Tensor)]
        if len(tensors) == 1:
            return outputs[tensors[0]]
        raise ModelError(
            f"the model returns a mapping with keys {list(outputs)} and no 'logits'; say "
            "which one the loss reads, e.g. task=fp.tasks.classification(output=lambda "
            f"out: out[{tensors[0] if tensors else 'KEY'!r}])"
        )
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise ModelError(
        f"the model returns {type(outputs).__name__}, not a tensor, a mapping with 'logits' "
        "or a tuple starting with one; give the task an output=... function that picks it"
    )


def _compute(pred: torch.Tensor) -> torch.Tensor:
    """Half-precision predictions in float32 for losses and metrics."""
    return pred.float() if pred.dtype in (torch.float16, torch.bfloat16) else pred


def per_sample_mean(values: torch.Tensor) -> torch.Tensor:
    """(N, ...) -> (N,): the mean over every dimension but the first."""
    return values.reshape(values.shape[0], -1).mean(1) if values.dim() > 1 else values


# -- the Task --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    """How a batch goes through a model and what each sample's loss is (module doc).

    ``Task(loss=fn)`` with ``fn(prediction, targets)`` returning per-sample losses (N,), or
    the batch mean, is a complete custom task; every other part has a default."""

    loss: Callable[[torch.Tensor, Any], torch.Tensor]
    name: str = "custom"
    metric: Callable[[torch.Tensor, Any], torch.Tensor] | None = None
    metric_name: str | None = None
    split: Callable[[Batch], tuple[Any, Any]] = split_batch
    call: Callable[[nn.Module, Any], Any] = call_model
    output: Callable[[Any], torch.Tensor] = logits_of
    check: Callable[[torch.Tensor, Any], None] | None = None

    def __post_init__(self) -> None:
        for field in ("loss", "split", "call", "output"):
            if not callable(getattr(self, field)):
                raise ConfigTypeError(f"Task.{field} must be a function, got "
                                      f"{getattr(self, field)!r}")
        if self.metric is not None and self.metric_name is None:
            object.__setattr__(self, "metric_name", "metric")

    def replace(self, **changes: Any) -> Task:
        """A copy with some parts changed, e.g. ``task.replace(output=lambda o: o[1])``."""
        return dataclasses.replace(self, **changes)

    def run(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, Any]:
        """(prediction, targets) of ``model`` on ``batch``."""
        inputs, targets = self.split(batch)
        return self.output(self.call(model, inputs)), targets

    def inputs(self, batch: Batch) -> Any:
        return self.split(batch)[0]

    def losses(self, pred: torch.Tensor, targets: Any) -> torch.Tensor:
        """Per-sample losses (N,), or a 0-d batch mean for a custom loss that returns one."""
        return self.loss(pred, targets)


def batch_mean(losses: torch.Tensor) -> torch.Tensor:
    """The mean loss of a batch from :meth:`Task.losses`."""
    return losses if losses.dim() == 0 else losses.mean()


def batch_sum(losses: torch.Tensor, n: int) -> torch.Tensor:
    """The summed loss of a batch of ``n`` samples from :meth:`Task.losses`."""
    return losses * n if losses.dim() == 0 else losses.sum()


# -- classification ---------------------------------------------------------------------------
def _class_targets(pred: torch.Tensor, y: Any) -> torch.Tensor:
    """Class-index targets shaped like the prediction without its class dimension; (N, 1)
    labels for (N, C) logits are flattened."""
    if not isinstance(y, torch.Tensor):
        raise DataError("this task needs targets, but the batches hold inputs only; give "
                        "(inputs, targets) pairs or a 'labels' entry")
    if not y.is_floating_point() and y.dtype != torch.int64:
        y = y.long()  # any integer width (cross-entropy takes int64 indices)
    if pred.dim() == 2 and y.dim() == 2 and y.shape[1] == 1 and not y.is_floating_point():
        return y.reshape(-1)
    return y


def _ce(pred: torch.Tensor, y: Any, ignore_index: int = -100) -> torch.Tensor:
    y = _class_targets(pred, y)
    pred = _compute(pred)
    if y.is_floating_point():  # class probabilities (soft labels), shaped like pred
        return per_sample_mean(F.cross_entropy(pred, y, reduction="none"))
    losses = F.cross_entropy(pred, y, reduction="none", ignore_index=ignore_index)
    if losses.dim() == 1:
        return losses
    valid = (y != ignore_index).reshape(y.shape[0], -1)
    total = losses.reshape(y.shape[0], -1).sum(1)
    return total / valid.sum(1).clamp_min(1)


def _hits(pred: torch.Tensor, y: Any, ignore_index: int = -100) -> torch.Tensor:
    y = _class_targets(pred, y)
    if y.is_floating_point():
        y = y.argmax(1)
    hit = (pred.argmax(1) == y).reshape(y.shape[0], -1).float()
    valid = (y != ignore_index).reshape(y.shape[0], -1).float()
    return (hit * valid).sum(1) / valid.sum(1).clamp_min(1)


def _check_classes(pred: torch.Tensor, y: Any, ignore_index: int, what: str) -> None:
    if pred.dim() < 2:
        raise ModelError(
            f"{what} needs outputs of shape (N, classes, ...); the model returns "
            f"{tuple(pred.shape)}. For one score per sample use task='binary_classification' "
            "or task='regression'"
        )
    c = pred.shape[1]
    if c < 2:
        raise ModelError(
            f"the model has {c} output per sample, so cross-entropy over its classes is "
            "constant and every gradient is zero; use task='binary_classification' (one "
            "logit) or task='regression'"
        )
    y = _class_targets(pred, y)
    if y.is_floating_point():
        if tuple(y.shape[1:]) != tuple(pred.shape[1:]):
            raise DataError(f"float targets must be class probabilities shaped like the "
                            f"outputs {tuple(pred.shape[1:])}, got {tuple(y.shape[1:])}")
        return
    if tuple(y.shape[1:]) != tuple(pred.shape[2:]):
        raise DataError(
            f"targets have shape {tuple(y.shape[1:])} per sample but the outputs "
            f"{tuple(pred.shape[1:])} need {tuple(pred.shape[2:])} class indices per sample"
            + ("; labels of shape (N, 1) are fine, (N, k) are not" if pred.dim() == 2 else "")
        )
    real = y[y != ignore_index]
    if real.numel() and (int(real.min()) < 0 or int(real.max()) >= c):
        raise DataError(
            f"labels must be class indices in [0, {c - 1}] (the model has {c} outputs); "
            f"the data has labels from {int(real.min())} to {int(real.max())}"
        )


def classification(output: Callable[[Any], torch.Tensor] = logits_of) -> Task:
    """Cross-entropy on (N, C) logits against class indices (N,) (or (N, 1), or class
    probabilities (N, C)); metric: top-1 accuracy. The default task."""
    return Task(name="classification", loss=_ce, metric=_hits, metric_name="accuracy",
                output=output, check=lambda p, y: _check_classes(p, y, -100, "classification"))


def dense_prediction(ignore_index: int = -100,
                     output: Callable[[Any], torch.Tensor] = logits_of) -> Task:
    """Per-pixel (or per-position) cross-entropy on (N, C, *S) outputs against (N, *S)
    class indices, averaged per sample over the positions whose label is not
    ``ignore_index``; metric: pixel accuracy."""
    return Task(name="dense_prediction", loss=lambda p, y: _ce(p, y, ignore_index),
                metric=lambda p, y: _hits(p, y, ignore_index), metric_name="pixel accuracy",
                output=output,
                check=lambda p, y: _check_classes(p, y, ignore_index, "dense prediction"))


def _shaped_like(pred: torch.Tensor, y: Any, what: str) -> torch.Tensor:
    if not isinstance(y, torch.Tensor):
        raise DataError(f"{what} needs targets, but the batches hold inputs only")
    if y.shape == pred.shape:
        return y
    if y.shape[:1] == pred.shape[:1] and y.numel() == pred.numel():
        return y.reshape(pred.shape)
    raise DataError(f"{what} targets have shape {tuple(y.shape[1:])} per sample but the "
                    f"model outputs {tuple(pred.shape[1:])}")


def _mse(pred: torch.Tensor, y: Any) -> torch.Tensor:
    pred = _compute(pred)
    y = _shaped_like(pred, y, "regression").to(pred.dtype)
    return per_sample_mean((pred - y) ** 2)


def regression(output: Callable[[Any], torch.Tensor] = logits_of) -> Task:
    """Mean squared error per sample (averaged over the output's entries); no metric."""

    def check(p: torch.Tensor, y: Any) -> None:
        _shaped_like(p, y[: p.shape[0]] if isinstance(y, torch.Tensor) else y, "regression")
        if not y.is_floating_point():
            raise DataError(f"regression targets must be floating point, got {y.dtype}")

    return Task(name="regression", loss=_mse, output=output, check=check)


def _bce(pred: torch.Tensor, y: Any) -> torch.Tensor:
    pred = _compute(pred)
    y = _shaped_like(pred, y, "binary classification").to(pred.dtype)
    return per_sample_mean(F.binary_cross_entropy_with_logits(pred, y, reduction="none"))


def _bce_hits(pred: torch.Tensor, y: Any) -> torch.Tensor:
    y = _shaped_like(pred, y, "binary classification")
    return per_sample_mean(((pred > 0) == (y > 0.5)).float())


def binary_classification(output: Callable[[Any], torch.Tensor] = logits_of) -> Task:
    """Binary cross-entropy on one logit per sample (N,) or (N, 1) against 0/1 targets;
    metric: accuracy of ``logit > 0``."""

    def check(p: torch.Tensor, y: Any) -> None:
        _shaped_like(p, y[: p.shape[0]] if isinstance(y, torch.Tensor) else y,
                     "binary classification")
        if y.numel() and (float(y.min()) < 0 or float(y.max()) > 1):
            raise DataError("binary classification targets must lie in [0, 1]")

    return Task(name="binary_classification", loss=_bce, metric=_bce_hits,
                metric_name="accuracy", output=output, check=check)


# -- language modelling ----------------------------------------------------------------------
def lm_split(batch: Batch) -> tuple[Any, torch.Tensor]:
    """Inputs without ``labels``; targets: ``labels`` if given, else the token ids with
    padded positions (``attention_mask == 0``) set to -100."""
    if isinstance(batch, torch.Tensor):
        return batch, batch
    if isinstance(batch, (tuple, list)):
        return split_batch(batch) if len(batch) > 1 else (batch[0], batch[0])
    if not isinstance(batch, Mapping) or ("input_ids" not in batch and "labels" not in batch):
        raise DataError("language modelling needs token ids: a tensor, or a dict with "
                        "'input_ids' (and optionally 'attention_mask' and 'labels')")
    inputs = {k: v for k, v in batch.items() if k not in LABEL_KEYS}
    if "labels" in batch:
        return inputs, batch["labels"]
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    return inputs, ids if mask is None else ids.masked_fill(mask == 0, -100)


def _next_token(pred: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, V, T-1), targets (N, T-1)) for predicting token t+1 from position t."""
    return pred[:, :-1].transpose(1, 2), y[:, 1:]


def _lm_loss(pred: torch.Tensor, y: Any, ignore_index: int) -> torch.Tensor:
    logits, target = _next_token(_compute(pred), y)
    return _ce(logits, target, ignore_index)


def _lm_hits(pred: torch.Tensor, y: Any, ignore_index: int) -> torch.Tensor:
    logits, target = _next_token(pred, y)
    return _hits(logits, target, ignore_index)


def _check_lm(pred: torch.Tensor, y: Any, ignore_index: int) -> None:
    if pred.dim() != 3:
        raise ModelError(f"language modelling needs logits (N, T, vocabulary); the model "
                         f"returns {tuple(pred.shape)}")
    if not isinstance(y, torch.Tensor) or y.dim() != 2 or y.shape[1] != pred.shape[1]:
        raise DataError(f"language modelling targets must be token ids (N, T={pred.shape[1]})"
                        f", got {None if not isinstance(y, torch.Tensor) else tuple(y.shape)}")
    real = y[y != ignore_index]
    if real.numel() and (int(real.min()) < 0 or int(real.max()) >= pred.shape[2]):
        raise DataError(f"token ids must lie in [0, {pred.shape[2] - 1}] (the vocabulary "
                        f"of the logits); the data has {int(real.min())}..{int(real.max())}")


def language_modeling(ignore_index: int = -100,
                      output: Callable[[Any], torch.Tensor] = logits_of) -> Task:
    """Next-token cross-entropy, averaged per sequence over the positions whose target is
    not ``ignore_index`` (HuggingFace's -100; padding is masked from ``attention_mask``);
    metric: next-token accuracy. Targets are ``labels`` when the batch has them (not
    shifted: the task shifts), else the input ids."""
    return Task(name="language_modeling", loss=lambda p, y: _lm_loss(p, y, ignore_index),
                metric=lambda p, y: _lm_hits(p, y, ignore_index),
                metric_name="next-token accuracy", split=lm_split, output=output,
                check=lambda p, y: _check_lm(p, y, ignore_index))


TASKS: dict[str, Callable[[], Task]] = {
    "classification": classification,
    "binary_classification": binary_classification,
    "regression": regression,
    "language_modeling": language_modeling,
    "dense_prediction": dense_prediction,
}


def as_task(task: object) -> Task:
    """A Task from None (classification), a built-in name, a loss function or a Task."""
    if task is None:
        return classification()
    if isinstance(task, Task):
        return task
    if isinstance(task, str):
        if task not in TASKS:
            raise ConfigError(f"unknown task {task!r}; choose one of {', '.join(TASKS)} or "
                              "pass a falcon_prune.Task")
        return TASKS[task]()
    if callable(task):
        return Task(loss=task)
    raise ConfigTypeError(f"task must be a built-in name ({', '.join(TASKS)}), a loss "
                          f"function or a falcon_prune.Task; got {type(task).__name__}")


class TaskRunner(nn.Module):
    """``model`` and ``task`` as one module whose ``forward(batch)`` returns (prediction,
    targets): what ``torch.func.functional_call`` swaps weights into (the model's
    parameters appear under ``model.<name>``)."""

    def __init__(self, model: nn.Module, task: Task):
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, batch: Batch) -> tuple[torch.Tensor, Any]:
        return self.task.run(self.model, batch)


def metric_key(prefix: str, task: Task) -> str | None:
    """The history/trajectory key of a task's metric, e.g. ``eval_accuracy``."""
    if task.metric is None:
        return None
    return f"{prefix}_{task.metric_name.replace(' ', '_').replace('-', '_')}"
