"""Re-estimating BatchNorm running statistics after pruning.

Pruning changes the distribution of every layer's output, so the running means and variances
a BatchNorm layer stored during training no longer match what it sees; in eval mode it then
normalises with the wrong statistics. Re-estimating them is forward passes over some
training inputs, with no gradient and no change to any weight (the affine scale and shift of
BatchNorm are kept too).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    """The model's BatchNorm layers (1d/2d/3d, SyncBatchNorm) that track running statistics."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def recalibrate_batchnorm(model: nn.Module, batches: torch.Tensor | Iterable[torch.Tensor],
                          device: str | torch.device | None = None,
                          batch_size: int = 256) -> int:
    """Replace every BatchNorm layer's running statistics by their average over ``batches``:
    input tensors (b, ...), or one tensor (N, ...) cut into near-equal batches of at most
    ``batch_size``, moved to ``device`` (default: the model's). Only the BatchNorm layers
    run in training mode, so dropout and the like stay off; the model's train/eval mode and
    the layers' momentum are restored. Returns the number of samples seen (0, and the model
    untouched, when it has no BatchNorm layer)."""
    bns = batchnorm_layers(model)
    if not bns:
        return 0
    if isinstance(batches, torch.Tensor):  # near-equal batches: each counts the same
        batches = batches.tensor_split(-(-len(batches) // batch_size)) if len(batches) else ()
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        raise ValueError("recalibrate_batchnorm got no batches; pass at least one input batch")
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
                model(x.to(device))
                seen += len(x)
    finally:
        for m, mom in zip(bns, momenta, strict=True):
            m.momentum = mom
        for m, was in saved:
            m.training = was
    return seen
