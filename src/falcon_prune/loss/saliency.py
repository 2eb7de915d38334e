"""Saliencies: how much the quadratic model Q says the loss grows when weights go.

Per weight: the optimal brain surgeon saliency w_i² / [H⁻¹]_ii (the increase of Q when w_i
alone is removed and the other weights compensate) and the diagonal Fisher saliency (no
compensation). Per group of weights (a channel unit): the same two for the whole group,
through the n x n Gram matrix of the gradient rows (Woodbury). H = XᵀX/n + λI throughout.
"""

from __future__ import annotations

import torch

from falcon_prune.loss.quadratic import QuadraticModel


def obs_saliency(qm: QuadraticModel) -> torch.Tensor:
    """Optimal brain surgeon saliency w_i^2 / [H^-1]_ii (p,) float64 at ``qm.w_bar``: the
    increase of Q when w_i alone is removed and the other weights compensate."""
    return qm.w_bar.double() ** 2 / inverse_hessian_diagonal(qm)


def fisher_saliency(qm: QuadraticModel) -> torch.Tensor:
    """Diagonal Fisher saliency w_i² (1/n) Σ_j x_ji² (p,) float64: the Fisher part of the
    increase of Q when w_i alone is removed and nothing compensates."""
    diag = torch.empty(qm.p, dtype=torch.float64, device=qm.device)
    qm.X.column_map(lambda Xc, a, b: Xc.square().mean(0).double(), diag)
    return qm.w_bar.double() ** 2 * diag


def inverse_hessian_diagonal(qm: QuadraticModel, mask: torch.Tensor | None = None
                             ) -> torch.Tensor:
    """diag((X^T X / n + lam I)^-1) (p,) float64 via Woodbury (or per block). With ``mask``
    (p,) bool, the Hessian restricted to that support T: the entries i in T are those of
    (X_T^T X_T / n + lam I)^-1, the others are meaningless."""
    X, n, lam = qm.X, qm.n, qm.lam
    if mask is None:
        mask = torch.ones(qm.p, dtype=torch.bool, device=qm.device)
    out = torch.empty(qm.p, dtype=torch.float64, device=qm.device)
    if qm.block_size is None:
        # [H^-1]_ii = (1 - ||L^-1 x_i||^2) / lam with L the Cholesky factor of X_T X_T^T +
        # n lam I (float64). L^-1 x_i comes from one triangular solve per chunk in X's
        # compute dtype; where float32 rounding would cancel (curvature far above lam) the
        # exact lower bound [H^-1]_ii >= 1 / H_ii keeps the value positive and of the right
        # size.
        K = qm.support_gram(mask.to(qm.device)).clone()
        K.diagonal().add_(lam * n)
        L = torch.linalg.cholesky(K).to(qm.dtype)

        def diagonal(Xc: torch.Tensor, a: int, b: int) -> torch.Tensor:
            q = torch.linalg.solve_triangular(L, Xc, upper=False).square().sum(0).double()
            lower = 1 / (lam + Xc.square().sum(0).double() / n)
            return torch.maximum((1 - q) / lam, lower)

        return X.column_map(diagonal, out)
    for a, b in qm.blocks():
        B = min(qm.block_size, b - a)
        Xb = X.columns(a, b).reshape(n, -1, B).permute(1, 0, 2).double()
        mb = mask[a:b].to(qm.device).view(-1, B).double()
        H = Xb.transpose(1, 2) @ Xb / n * mb[:, :, None] * mb[:, None, :]
        H.diagonal(dim1=1, dim2=2).add_(lam)
        out[a:b] = (
            torch.cholesky_inverse(torch.linalg.cholesky(H)).diagonal(dim1=1, dim2=2).reshape(-1)
        )
    return out


def group_obs(qm: QuadraticModel, ptr: torch.Tensor, cols: torch.Tensor, rank: int | None
              ) -> torch.Tensor:
    """(m,) float64 over m groups of weights (group u: ``cols[ptr[u]:ptr[u+1]]``, positions
    in qm's weights): the increase of Q when a group's weights G are removed and every other
    weight compensates, (1/2) w_Gᵀ [(H⁻¹)_GG]⁻¹ w_G with H = XᵀX/n + λI, computed through
    the eigenvectors of the n x n Gram matrix XXᵀ (Woodbury): with X_r the ``rank``
    leading rotated rows (all n when None) and Z = (Λ + nλ)^(-1/2) X_r,
    λ (H⁻¹)_GG = I - Z_GᵀZ_G, solved in the smaller of the |G| x |G| and r x r forms."""
    n, lam = qm.n, qm.lam
    K = qm.support_gram(torch.ones(qm.p, dtype=torch.bool, device=qm.device))
    evals, evecs = torch.linalg.eigh(K)
    r = n if rank is None else min(rank, n)
    evals, evecs = evals[-r:].clamp_min(0), evecs[:, -r:]
    scale = (evals + n * lam).rsqrt()
    Z = torch.empty((r, qm.p), dtype=torch.float32, device=qm.device)
    Q = (evecs * scale).to(qm.dtype)
    qm.X.column_map(lambda Xc, a, b: (Q.T @ Xc).float(), Z)
    floor = lam / (lam + float(evals.max()) / n + 1e-300)  # eigenvalues of λ(H⁻¹)_GG
    w = qm.w_bar.double()
    out = torch.zeros(len(ptr) - 1, dtype=torch.float64)
    for u in range(len(ptr) - 1):
        group = cols[ptr[u]:ptr[u + 1]].to(qm.device)
        if len(group):
            out[u] = 0.5 * lam * _quad_form(Z[:, group].double(), w[group], floor)
    return out


def group_fisher(qm: QuadraticModel, ptr: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(m,) float64 over the groups of weights ``cols[ptr[u]:ptr[u+1]]``: the Fisher part
    of Q when a group's weights G are removed and nothing compensates,
    (1/2n) Σ_j (x_jGᵀ w_G)²: a second-order loss estimate that does not depend on the
    scale of layers followed by normalisation."""
    m = len(ptr) - 1
    owner = torch.repeat_interleave(torch.arange(m), torch.diff(ptr))
    order = torch.argsort(cols)
    cols, owner = cols[order], owner[order]
    S = torch.zeros((qm.n, m), dtype=torch.float64, device=qm.device)
    w = qm.w_bar
    bounds = torch.searchsorted(cols, torch.tensor([a for a, _ in qm.X.ranges()] + [qm.p]))
    for k, (a, b) in enumerate(qm.X.ranges()):
        lo, hi = int(bounds[k]), int(bounds[k + 1])
        if hi > lo:
            part = qm.X.columns(a, b) * w[a:b]
            c = cols[lo:hi].to(qm.device) - a
            S.index_add_(1, owner[lo:hi].to(qm.device), part[:, c].double())
    return 0.5 * S.square().mean(0).cpu()


def _quad_form(Zg: torch.Tensor, wg: torch.Tensor, floor: float) -> float:
    """w_Gᵀ (I - Z_GᵀZ_G)⁻¹ w_G with Z_G (r, k), eigenvalues floored at ``floor``."""
    r, k = Zg.shape
    if k <= r:
        A = torch.eye(k, dtype=Zg.dtype, device=Zg.device) - Zg.T @ Zg
        e, V = torch.linalg.eigh(A)
        proj = V.T @ wg
        return float((proj.square() / e.clamp_min(floor)).sum())
    y = Zg @ wg  # Woodbury: |w|² + yᵀ (I - Z Zᵀ)⁻¹ y
    B = torch.eye(r, dtype=Zg.dtype, device=Zg.device) - Zg @ Zg.T
    e, V = torch.linalg.eigh(B)
    proj = V.T @ y
    return float(wg.square().sum() + (proj.square() / e.clamp_min(floor)).sum())
