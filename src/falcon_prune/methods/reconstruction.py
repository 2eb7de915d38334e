"""Better solutions of a layer's quadratic than one OBS sweep: exact refits and support
changes.

For weights W (r, d) and the input Gram H (d, d) the layer's reconstruction error is
E(Ŵ) = tr((W - Ŵ) H (W - Ŵ)ᵀ), one quadratic per output row. An OBS sweep
(:mod:`falcon_prune.methods.sparsegpt`) lets only the columns to the right of a pruned
weight compensate for it; two things do better:

- :func:`refit`, the exact minimiser of E on a fixed support: every row's kept weights solve
  H_SS ŵ_S = (H w)_S, found by conjugate gradients run on all rows at once (one product
  with H per iteration, preconditioned by H's diagonal), warm-started from the sweep;
- :func:`improve`, iterative hard thresholding on E (FALCON's search on the layer's own
  quadratic): a gradient step from the refitted weights, the support re-chosen from the
  result (the largest v_ij² H_jj, the same number of weights, or the n:m pattern), then a
  refit; a round is kept only when it lowers E.

Both work on H with a small ridge (``damp`` times its mean diagonal), as the sweep does.
"""

from __future__ import annotations

import torch

from falcon_prune.methods.sparsegpt import damped, sweep

#: conjugate-gradient iterations of a refit, and rounds of hard thresholding after it
REFIT_ITERATIONS = 10
REFINE_ROUNDS = 2


def layer_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """E per output row (r,) float64 for W, Ŵ (r, d) and H (d, d)."""
    D = (W - W_hat).to(H.dtype)
    return ((D @ H) * D).sum(1).to(torch.float64)


def relative_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - Ŵ) H (W - Ŵ)ᵀ) / tr(W H Wᵀ): a layer's error relative to the energy of
    its outputs (0: unchanged, 1: as bad as zeroing it)."""
    W = W.to(H.dtype)
    energy = max(float(((W @ H) * W).sum()), 1e-300)
    return float(layer_error(W, W_hat.to(H.dtype), H).sum()) / energy


def refit(W: torch.Tensor, H: torch.Tensor, keep: torch.Tensor, start: torch.Tensor,
          iterations: int = 10) -> torch.Tensor:
    """The minimiser of E over Ŵ with Ŵ = 0 outside ``keep`` (r, d) bool, by
    ``iterations`` of conjugate gradients from ``start`` (r, d), all rows at once; H is
    used as given (add a ridge before). Returns Ŵ (r, d) in H's dtype."""
    A, m = H, keep.to(H.dtype)
    x = start.to(H.dtype) * m
    target = W.to(H.dtype)
    pre = 1.0 / A.diagonal().clamp_min(1e-30)
    r = ((target - x) @ A) * m  # minus the gradient of E/2, on the support
    z = r * pre
    p = z.clone()
    rz = (r * z).sum(1, keepdim=True)
    for _ in range(iterations):
        Ap = (p @ A) * m
        step = rz / (p * Ap).sum(1, keepdim=True).clamp_min(1e-30)
        x = x + step * p
        r = r - step * Ap
        z = r * pre
        rz_new = (r * z).sum(1, keepdim=True)
        p = z + (rz_new / rz.clamp_min(1e-30)) * p
        rz = rz_new
    return x


def largest_eigenvalue(A: torch.Tensor, iterations: int = 30) -> float:
    """An upper estimate of the largest eigenvalue of the symmetric positive definite A:
    power iteration from a fixed start, with 5 % added (the step 1/L of hard thresholding
    then stays below 1/λ_max up to that margin)."""
    v = torch.ones(A.shape[0], dtype=A.dtype, device=A.device) / A.shape[0] ** 0.5
    value = 0.0
    for _ in range(iterations):
        w = A @ v
        value = float(w.norm())
        v = w / max(value, 1e-30)
    return 1.05 * value


def _project(v: torch.Tensor, h: torch.Tensor, count: int | None,
             pattern: tuple[int, int] | None) -> torch.Tensor:
    """(r, d) bool: the ``count`` largest v_ij² h_j of the layer, or the n largest of every
    m consecutive inputs of a row."""
    score = v.square() * h
    keep = torch.zeros_like(v, dtype=torch.bool)
    if pattern is not None:
        n, m = pattern
        r, d = v.shape
        groups = score[:, : d - d % m].reshape(r, -1, m)
        top = torch.topk(groups, n, dim=-1).indices
        keep[:, : d - d % m] = torch.zeros_like(groups, dtype=torch.bool).scatter_(
            -1, top, True).reshape(r, -1)
        keep[:, d - d % m:] = True  # a tail shorter than m stays
        return keep
    keep.view(-1)[torch.topk(score.reshape(-1), count).indices] = True
    return keep


def improve(W: torch.Tensor, H: torch.Tensor, W_hat: torch.Tensor, keep: torch.Tensor,
            rounds: int = 2, iterations: int = 10, damp: float = 0.01,
            pattern: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Refit ``W_hat`` (r, d) on its support ``keep``, then up to ``rounds`` rounds of
    hard thresholding (step 1/L, L the largest eigenvalue of the damped H) and refits;
    each round is kept only when it lowers E with the undamped H. Returns (Ŵ, keep) in
    float32."""
    A = damped(H, damp).float()
    Hf = H.float()
    best = refit(W, A, keep, W_hat, iterations)
    best_err = float(layer_error(W, best, Hf).sum())
    if float(layer_error(W, W_hat, Hf).sum()) < best_err:
        best, best_err = W_hat.float() * keep, float(layer_error(W, W_hat, Hf).sum())
    step = 1.0 / largest_eigenvalue(A)
    count = int(keep.sum())
    h = A.diagonal()
    for _ in range(rounds):
        v = best - step * ((best - W.float()) @ A)
        support = _project(v, h, count, pattern)
        candidate = refit(W, A, support, v * support, iterations)
        err = float(layer_error(W, candidate, Hf).sum())
        if err >= best_err:
            break
        best, best_err, keep = candidate, err, support
    return best, keep


def solve_layer(W: torch.Tensor, H: torch.Tensor, count: int | None,
                pattern: tuple[int, int] | None, config) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer solver of ``method='falcon'`` with the layer-wise loss model: an OBS
    sweep for the support, then the exact refit and the rounds of hard thresholding of
    :func:`improve`."""
    W_hat, keep = sweep(W, H, None if count is None else [count], pattern, config.damp)
    W_hat, keep = improve(W, H, W_hat[0], keep[0], rounds=REFINE_ROUNDS,
                          iterations=REFIT_ITERATIONS, damp=config.damp, pattern=pattern)
    return W_hat.to(W.dtype), keep
