"""Removing whole columns of a layer: OBS over groups of columns, and the least-squares refit.

A structured unit (an MLP channel, an attention head group) is a set of columns S of the
layer that reads it, y = W x with W (r, c) and the Gram of its inputs H (c, c). Removing S
and refitting the other columns to the same outputs on the calibration inputs is

    min over W' with W'[:, S] = 0 of  tr((W - W') H (W - W')ᵀ),

whose solution moves the error of the removed columns onto the kept ones through H. With
G = H⁻¹ (damped: H + λ·mean(diag H)·I, the ridge), removing S from a layer whose kept
columns are already optimal costs exactly

    E(S) = tr(W_S (G_SS)⁻¹ W_Sᵀ),   W ← W - W_S (G_SS)⁻¹ G_S:,   G ← G - G_:S (G_SS)⁻¹ G_S:,

the last step being the Schur complement that makes G the inverse Gram of the kept
columns. :func:`remove_units` takes, step after step, the unit of least E (greedy OBS; in
chunks of several units when there are more than MAX_STEPS), which gives both the order of
removal and the error after each step (a layer's error curve in one sweep).
:func:`refit` gives the kept columns' least-squares weights in closed form,
W' = W H[:, K] (H[K, K])⁻¹ (the same weights as the updates, computed once).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: at most this many greedy steps per sweep: larger layers remove several units per step
MAX_STEPS = 64


def damped(H: torch.Tensor, damp: float) -> torch.Tensor:
    """H + damp·mean(diag H)·I in float64 (the ridge of the refit)."""
    H = H.double()
    lam = damp * float(H.diagonal().mean()) + 1e-12
    return H + lam * torch.eye(len(H), dtype=H.dtype, device=H.device)


@dataclass
class Removal:
    """A greedy sweep: ``order`` (k,) the units removed, first to last; ``errors`` (k+1,)
    the layer's error tr((W - W') H (W - W')ᵀ) after 0, 1, ..., k removals; ``after``
    (k+1,) how many units were removed at each of those points."""

    order: torch.Tensor
    errors: list[float]
    after: list[int]

    def kept(self, units: int, keep: int) -> torch.Tensor:
        """(units,) bool: the units left when the sweep has removed ``units - keep``."""
        mask = torch.ones(units, dtype=torch.bool)
        mask[self.order[:units - keep]] = False
        return mask


def _scores(W: torch.Tensor, G: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """(U,) E(S_u) = tr(W_S (G_SS)⁻¹ W_Sᵀ) of every unit u (groups (U, g) of columns)."""
    if groups.shape[1] == 1:  # single columns: ‖w_u‖² / G_uu
        u = groups[:, 0]
        return W[:, u].pow(2).sum(0) / G[u, u]
    Gs = G[groups[:, :, None], groups[:, None, :]]  # (U, g, g)
    Ws = W[:, groups].permute(1, 0, 2)  # (U, r, g)
    X = torch.linalg.solve(Gs, Ws.transpose(1, 2))  # (U, g, r)
    return (X.transpose(1, 2) * Ws).sum((1, 2))


def remove_units(W: torch.Tensor, H: torch.Tensor, groups: torch.Tensor, least: int,
                 damp: float = 0.01) -> Removal:
    """Greedy OBS removal of units (``groups`` (U, g): each unit's columns of W (r, c)),
    with H (c, c) the Gram of the layer's inputs, down to ``least`` kept units."""
    U = len(groups)
    groups = groups.to(W.device)
    W = W.double().clone()
    G = torch.cholesky_inverse(torch.linalg.cholesky(damped(H, damp)))
    alive = torch.ones(U, dtype=torch.bool, device=W.device)
    per = max(1, -(-(U - least) // MAX_STEPS))
    order, errors, after, total = [], [0.0], [0], 0.0
    while len(order) < U - least:
        s = _scores(W, G, groups).masked_fill(~alive, float("inf"))
        step = s.topk(min(per, U - least - len(order)), largest=False).indices
        S = groups[step].reshape(-1)
        Gss = G[S][:, S]
        total += float(torch.linalg.solve(Gss, W[:, S].T).T.mul(W[:, S]).sum())
        K = torch.linalg.solve(Gss, G[S])  # (|S|, c)
        W -= W[:, S] @ K
        G -= G[:, S] @ K
        W[:, S] = 0
        G[S] = 0
        G[:, S] = 0
        G[S, S] = 1.0  # a removed column stays out of later scores and updates
        alive[step] = False
        order += step.tolist()
        errors.append(total)
        after.append(len(order))
    return Removal(torch.tensor(order, dtype=torch.int64), errors, after)


def refit(W: torch.Tensor, H: torch.Tensor, columns: torch.Tensor, damp: float = 0.01
          ) -> torch.Tensor:
    """(r, |K|) the least-squares weights of the kept ``columns`` K of W (r, c) on inputs
    of Gram H (c, c), with the ridge: W H_d[:, K] (H_d[K, K])⁻¹, H_d = :func:`damped`."""
    Hd = damped(H, damp)
    L = torch.linalg.cholesky(Hd[columns][:, columns])
    rhs = (W.double() @ Hd[:, columns]).T  # (|K|, r)
    return torch.cholesky_solve(rhs, L).T
