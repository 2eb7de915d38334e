"""Optimal brain surgeon column sweeps on a layer's quadratic (SparseGPT's algorithm).

A linear layer ``y = W x`` with weights W (r, d) and the input Gram H = E[x xᵀ] (d, d)
has the reconstruction error of pruned weights Ŵ

    E(Ŵ) = tr((W - Ŵ) H (W - Ŵ)ᵀ),

a separate quadratic for every output row. Removing weight j of a row and letting the
row's other weights compensate optimally costs w_j² / [H⁻¹]_jj and changes the row by
-(w_j / [H⁻¹]_jj) H⁻¹_{:,j}. The sweep visits the columns left to right and only lets the
columns to the right compensate; then the inverse Hessian of the remaining columns at
column j is the j-th row of U, the upper Cholesky factor of H⁻¹ (H⁻¹ = Uᵀ U), scaled by
U_jj: one factorisation serves every step. Updates to the columns beyond the current block
of ``block`` columns are applied once per block (lazy batch updates). Which weights of a
block go is decided when the sweep reaches the block, on the updated weights, by the
saliency w_j² / U_jj²: the block's share of the weights to prune, smallest first, or, for
an N:M pattern, the M - N smallest of every M consecutive inputs of a row.

:func:`sweep` returns the pruned weights; sweeps to a grid of kept counts, run together,
give a layer's error curve (:func:`error_curve`).
"""

from __future__ import annotations

import torch

#: columns whose later updates are applied together
BLOCK = 128
#: rows an error curve is measured on (evenly spaced; None: all)
CURVE_ROWS = 128


def damped(H: torch.Tensor, damp: float) -> torch.Tensor:
    """H (d, d) in float64 plus ``damp`` times its mean diagonal on the diagonal; inputs
    that never fire (zero diagonal) get 1 there."""
    H = H.to(torch.float64).clone()
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1.0
    H.diagonal().add_(damp * float(H.diagonal().mean()))
    return H


def inverse_factor(H: torch.Tensor) -> torch.Tensor:
    """U (d, d), upper triangular with H⁻¹ = Uᵀ U, for a positive definite H (float64).

    With J the reversal of the order, J H J = M Mᵀ (M lower) makes H = R Rᵀ with
    R = J M J upper, so U = R⁻¹: one factorisation and one triangular inverse (the
    inverse of H itself is never formed)."""
    order = torch.arange(H.shape[0] - 1, -1, -1, device=H.device)
    R = torch.linalg.cholesky(H[order][:, order])[order][:, order]
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    return torch.linalg.solve_triangular(R, eye, upper=True)


def reconstruction_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - Ŵ) H (W - Ŵ)ᵀ) for W, Ŵ (r, d) and H (d, d), in float64."""
    D = (W - W_hat).to(torch.float64)
    return float(((D @ H.to(torch.float64)) * D).sum())


def _block_prune(Wb: torch.Tensor, u: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """(K, r, b) bool: in copy k of the block, the ``counts[k]`` weights of smallest
    saliency w² / u² (u: the block's diagonal of U)."""
    saliency = (Wb.square() / u.square()).reshape(len(counts), -1)
    mask = torch.zeros(saliency.shape, dtype=torch.bool, device=Wb.device)
    for k, count in enumerate(counts):
        if count > 0:
            mask[k, torch.topk(saliency[k], count, largest=False).indices] = True
    return mask.view(Wb.shape)


def _group_prune(Wg: torch.Tensor, u: torch.Tensor, n: int) -> torch.Tensor:
    """(m, N) bool for the m consecutive inputs ``Wg`` (m, N) of N rows: in every row, the
    m - n of smallest saliency w² / u² (an n:m group)."""
    saliency = Wg.square() / u.square()[:, None]
    mask = torch.zeros_like(Wg, dtype=torch.bool)
    drop = Wg.shape[0] - n
    if drop > 0:
        mask.scatter_(0, torch.topk(saliency, drop, dim=0, largest=False).indices, True)
    return mask


def _counts(sizes: list[int], prune: int) -> list[int]:
    """Weights to prune in each block, ``prune`` in all, spread in proportion to the
    blocks' sizes (cumulative rounding)."""
    total, out, done, seen = sum(sizes), [], 0, 0
    for size in sizes:
        seen += size
        out.append(max(0, min(size, round(prune * seen / total) - done)))
        done += out[-1]
    return out


def sweep(W: torch.Tensor, H: torch.Tensor, kept: list[int] | None = None,
          pattern: tuple[int, int] | None = None, damp: float = 0.01,
          U: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune W (r, d) by OBS sweeps over H (d, d), one per count of weights ``kept``
    (unstructured; all run together, sharing the column loop), or one to an n:m
    ``pattern``. Returns (Ŵ (K, r, d) float64, kept masks (K, r, d) bool), K sweeps;
    ``U``: :func:`inverse_factor` of the damped H when already computed."""
    if (kept is None) == (pattern is None):
        raise ValueError("give counts of kept weights or a pattern")
    r, d = W.shape
    U = inverse_factor(damped(H, damp)) if U is None else U
    K = 1 if pattern is not None else len(kept)
    work = W.to(torch.float64).repeat(K, 1, 1)
    work[:, :, H.diagonal() == 0] = 0.0
    pruned = torch.zeros((K, r, d), dtype=torch.bool, device=W.device)
    starts = list(range(0, d, BLOCK))
    sizes = [r * min(BLOCK, d - a) for a in starts]
    counts = [] if pattern is not None else [_counts(sizes, r * d - k) for k in kept]
    for i, a in enumerate(starts):
        b = min(a + BLOCK, d)
        Ub = U[a:b, a:b]
        if pattern is None:
            mask = _block_prune(work[:, :, a:b], Ub.diagonal(), [c[i] for c in counts])
        else:
            mask = torch.zeros((K, r, b - a), dtype=torch.bool, device=W.device)
        # the block's columns as rows (b - a, K r): each step updates a contiguous slab
        cols = work[:, :, a:b].permute(2, 0, 1).reshape(b - a, K * r).contiguous()
        drop = mask.permute(2, 0, 1).reshape(b - a, K * r).contiguous()
        err = torch.zeros_like(cols)
        for j in range(b - a):
            if pattern is not None and j % pattern[1] == 0:  # decided on the updated weights
                g = slice(j, min(j + pattern[1], b - a))
                drop[g] = _group_prune(cols[g], Ub.diagonal()[g], pattern[0])
            e = cols[j] * drop[j] / Ub[j, j]  # the removed weights, scaled
            cols[j:].addr_(Ub[j, j:], e, alpha=-1.0)  # rank one, in place
            err[j] = e
        pruned[:, :, a:b] = drop.reshape(b - a, K, r).permute(1, 2, 0)
        work[:, :, a:b] = cols.reshape(b - a, K, r).permute(1, 2, 0)
        work[:, :, b:] -= err.reshape(b - a, K, r).permute(1, 2, 0) @ U[a:b, b:]
    work[pruned] = 0.0
    return work, ~pruned


def error_curve(W: torch.Tensor, H: torch.Tensor, kept: list[int], damp: float = 0.01,
                rows: int | None = CURVE_ROWS) -> list[float]:
    """The reconstruction error of :func:`sweep` keeping each count of ``kept``. Rows are
    independent problems: with ``rows``, the sweeps run on that many evenly spaced rows
    (their share of each count) and the errors are scaled to all rows."""
    r = W.shape[0]
    if rows is not None and rows < r:
        pick = torch.linspace(0, r - 1, rows, device=W.device).round().long()
        W, share = W[pick], rows / r
        kept = [round(k * share) for k in kept]
    else:
        share = 1.0
    W_hat, _ = sweep(W, H, kept, damp=damp)
    D = W_hat - W.to(torch.float64)
    return [e / share for e in ((D @ H.to(torch.float64)) * D).sum((1, 2)).tolist()]


def solve_layer(W: torch.Tensor, H: torch.Tensor, count: int | None,
                pattern: tuple[int, int] | None, config) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer solver of ``method='sparsegpt'``: one sweep keeping ``count`` weights or
    the ``pattern``; (Ŵ (r, d) in W's dtype, kept (r, d) bool)."""
    W_hat, keep = sweep(W, H, None if count is None else [count], pattern, config.damp)
    return W_hat[0].to(W.dtype), keep[0]


def n_m(pattern: str) -> tuple[int, int]:
    """'2:4' -> (2, 4): n kept of every m consecutive inputs of a row."""
    try:
        n, m = (int(x) for x in pattern.split(":"))
    except (ValueError, AttributeError) as e:
        raise ValueError(f"pattern must look like '2:4' (n kept of every m), got "
                         f"{pattern!r}") from e
    if not 0 < n < m:
        raise ValueError(f"pattern {pattern!r} must keep 0 < n < m of every m inputs")
    return n, m

