"""Wanda: prune by weight magnitude times input norm, per output row, without updates.

The score of weight (i, j) of a linear layer is |W_ij| ‖x_j‖₂, with ‖x_j‖₂² = H_jj the
input's mean square (the Gram's diagonal): the first-order size of the output change
when the weight goes. Each output row keeps its largest scores (the fraction ``density``
of the row), or the n largest of every m consecutive inputs for an n:m pattern; the kept
weights are not changed.
"""

from __future__ import annotations

import torch


def wanda(W: torch.Tensor, H: torch.Tensor, count: int | None = None,
          pattern: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(Ŵ (r, d), kept (r, d) bool) of W (r, d) with the input Gram H (d, d), keeping
    ``count`` weights or the n:m ``pattern``."""
    if (count is None) == (pattern is None):
        raise ValueError("give a count of kept weights or a pattern")
    score = W.abs().to(torch.float64) * H.diagonal().to(torch.float64).clamp_min(0).sqrt()
    r, d = W.shape
    keep = torch.zeros((r, d), dtype=torch.bool, device=W.device)
    if pattern is not None:
        n, m = pattern
        full = d - d % m
        groups = score[:, :full].reshape(r, -1, m)
        top = torch.topk(groups, n, dim=-1).indices
        keep[:, :full] = torch.zeros_like(groups, dtype=torch.bool).scatter_(
            -1, top, True).reshape(r, -1)
        keep[:, full:] = True
    else:  # rows keep count // r, the first count % r rows one more
        order = torch.argsort(score, dim=1, descending=True)
        per_row = torch.full((r, 1), count // r, device=W.device)
        per_row[: count % r] += 1
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(d, device=W.device).expand(r, d))
        keep = ranks < per_row
    return W * keep, keep


def solve_layer(W: torch.Tensor, H: torch.Tensor, count: int | None,
                pattern: tuple[int, int] | None, config) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer solver of ``method='wanda'``."""
    return wanda(W, H, count, pattern)
