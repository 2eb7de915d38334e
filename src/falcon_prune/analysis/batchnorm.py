"""Re-estimating BatchNorm running statistics after pruning.

Pruning changes the distribution of every layer's output, so the running means and variances
a BatchNorm layer stored during training no longer match what it sees; in eval mode it then
normalises with the wrong statistics. Re-estimating them is forward passes over some
training inputs, with no gradient and no change to any weight (the affine scale and shift of
BatchNorm are kept too).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from falcon_prune.data.batches import batch_size as batch_size_of
from falcon_prune.data.batches import take, to_device
from falcon_prune.data.tasks import call_model
from falcon_prune.errors import ConfigError, DataError


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    """The model's BatchNorm layers (1d/2d/3d, SyncBatchNorm) that track running statistics."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def _input_batches(inputs: object, batch_size: int) -> Iterable:
    """Model-input batches: one tensor or mapping of N samples is cut into near-equal
    batches of at most ``batch_size`` (each counts the same); anything else is iterated."""
    if isinstance(inputs, (torch.Tensor, Mapping)):
        n = batch_size_of(inputs)
        k = -(-n // batch_size)  # as torch.tensor_split(k): the first n % k get one more
        bounds = [0]
        for i in range(k):
            bounds.append(bounds[-1] + n // k + (1 if i < n % k else 0))
        return [take(inputs, slice(a, b)) for a, b in zip(bounds[:-1], bounds[1:],
                                                          strict=True)]
    return inputs  # type: ignore[return-value]


def recalibrate_batchnorm(model: nn.Module, inputs: object,
                          device: str | torch.device | None = None, batch_size: int = 256,
                          call: Callable[[nn.Module, object], object] = call_model) -> int:
    """Replace every BatchNorm layer's running statistics by their average over model
    inputs: one batch of N samples (a tensor, or a dict of tensors) cut into near-equal
    batches of at most ``batch_size``, or an iterable of input batches; each is moved to
    ``device`` (default: the model's) and run by ``call(model, inputs)``. Only the
    BatchNorm layers run in training mode, so dropout and the like stay off; the model's
    train/eval mode and the layers' momentum are restored. Returns the number of samples
    seen (0, and the model untouched, when it has no BatchNorm layer)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    bns = batchnorm_layers(model)
    if not bns:
        return 0
    batches = iter(_input_batches(inputs, batch_size))
    first = next(batches, None)
    if first is None:
        raise DataError("recalibrate_batchnorm got no batches; pass at least one input batch")
    if device is None:
        device = next(model.parameters()).device
    saved = [(m, m.training) for m in model.modules()]
    momenta = [m.momentum for m in bns]
    seen = 0
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches
        model.eval()
        for m in bns:
            m.train()
        with torch.no_grad():
            for x in (first, *batches):
                call(model, to_device(x, device))
                seen += batch_size_of(x)
    finally:
        for m, mom in zip(bns, momenta, strict=True):
            m.momentum = mom
        for m, was in saved:
            m.training = was
    return seen
