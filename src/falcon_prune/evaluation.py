"""Evaluating networks: top-1 accuracy on a data set and FLOP/NNZ fractions."""

from __future__ import annotations

import torch
from torch import nn

from falcon_prune.fisher import as_samples


def accuracy(model: nn.Module, data: object, batch_size: int = 256,
             device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy of ``model`` (eval mode) on ``data`` ((x, y) tensors, a Dataset or a
    loader of batches)."""
    s = as_samples(data)
    was_training = model.training
    model.eval()
    correct = 0
    try:
        with torch.no_grad():
            for a in range(0, len(s), batch_size):
                out = model(s.x[a : a + batch_size].to(device))
                correct += int((out.argmax(1).cpu() == s.y[a : a + batch_size]).sum())
    finally:
        model.train(was_training)
    return correct / max(1, len(s))
