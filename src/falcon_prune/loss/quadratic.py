"""The local quadratic model of the loss (docs/method.md, the loss model)::

    Q(w) = 1/(2n) ||X (w - w_bar)||^2 + lam/2 ||w - w_bar||^2 + alpha g^T (w - w_bar)

with X (n, p) the gradient matrix and g its row mean. Products with X cost O(np); the exact
minimiser on a support is an n x n solve (Woodbury); with ``block_size`` set, X^T X is
replaced by its block-diagonal part (blocks of consecutive weights), which makes every
support solve small and independent.

X is a tensor or a :class:`~falcon_prune.storage.GradientStore` (in memory or on disk, any
storage dtype); every product reads it in column chunks, so the same code serves both.
"""

from __future__ import annotations

import torch

from falcon_prune.errors import ConfigError
from falcon_prune.loss.storage import GradientStore


class _GramCache:
    """Support Gram matrices shared by models that differ only in lam/alpha."""

    def __init__(self) -> None:
        self.full: torch.Tensor | None = None
        self.gram: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None


class QuadraticModel:
    """Q around ``w_bar`` (p,). ``X`` (n, p): a tensor (float32/float64, any device) or a
    :class:`GradientStore`; vectors w are (p,) in the compute dtype (``dtype``: float64 for
    float64 storage, else float32) on X's device. ``lam`` > 0 is the ridge, ``alpha`` >= 0
    the first-order scale; ``chunk`` columns per chunk of the Gram and block computations."""

    def __init__(
        self,
        X: torch.Tensor | GradientStore,
        w_bar: torch.Tensor,
        lam: float,
        alpha: float = 0.0,
        block_size: int | None = None,
        chunk: int = 1 << 16,
    ):
        if isinstance(X, torch.Tensor):
            if X.dim() != 2:
                raise ConfigError(f"X must be (n, p={w_bar.numel()}), got {tuple(X.shape)}")
            X = GradientStore.from_tensor(X)
        if X.p != w_bar.numel():
            raise ConfigError(f"X must be (n, p={w_bar.numel()}), got {tuple(X.shape)}")
        if not lam > 0:
            raise ConfigError(f"the ridge lam must be > 0, got {lam}")
        if alpha < 0:
            raise ConfigError(f"alpha must be >= 0, got {alpha}")
        if block_size is not None and block_size < 1:
            raise ConfigError(f"block_size must be a positive integer or None, got {block_size}")
        self.X = X
        self.n, self.p = X.shape
        self.dtype, self.device = X.compute_dtype, X.device
        self.w_bar = w_bar.to(self.device, self.dtype)
        self.lam = float(lam)
        self.alpha = float(alpha)
        # the first-order term's mean gradient (p,); None when alpha = 0 (no zero vector)
        self.g = X.column_mean() if alpha > 0 else None
        self.block_size = block_size
        self.chunk = chunk
        self._cache = _GramCache()

    def with_ridge(self, lam: float) -> QuadraticModel:
        """The same model with ridge ``lam``; shares X and the cached support Gram matrices."""
        other = QuadraticModel(self.X, self.w_bar, lam, 0.0, self.block_size, self.chunk)
        other.alpha, other.g, other._cache = self.alpha, self.g, self._cache
        return other

    # -- products -----------------------------------------------------------------------
    def blocks(self):
        """(start, stop) column ranges: whole blocks batched together, then the tail."""
        B = self.block_size
        full = (self.p // B) * B
        per = max(1, self.chunk // B)
        for a in range(0, full, per * B):
            yield a, min(full, a + per * B)
        if full < self.p:
            yield full, self.p

    def hessian_vec(self, d: torch.Tensor) -> torch.Tensor:
        """(X^T X / n) d, or its block-diagonal version; d (p,) -> (p,)."""
        if self.block_size is None:
            return self.X.rmatvec(self.X.matvec(d)) / self.n
        out = torch.empty_like(d)
        for a, b in self.blocks():
            B = min(self.block_size, b - a)
            Xb = self.X.columns(a, b).reshape(self.n, -1, B)  # (n, k, B)
            y = torch.einsum("nkb,kb->nk", Xb, d[a:b].view(-1, B))
            out[a:b] = torch.einsum("nkb,nk->kb", Xb, y).reshape(-1) / self.n
        return out

    def _linear(self, d: torch.Tensor) -> float:
        """alpha g^T d (0 without the first-order term)."""
        return self.alpha * float(self.g @ d) if self.g is not None else 0.0

    def _add_linear_(self, v: torch.Tensor) -> torch.Tensor:
        """v + alpha g, in place on ``v`` (a temporary)."""
        return v.add_(self.g, alpha=self.alpha) if self.g is not None else v

    def value_and_grad(self, w: torch.Tensor) -> tuple[float, torch.Tensor]:
        """(Q(w), grad Q(w)) with a single Hessian-vector product; the gradient is built in
        place on H d (no further (p,) temporaries)."""
        d = w - self.w_bar
        hd = self.hessian_vec(d)
        q = float(d @ hd) / 2 + self.lam / 2 * float(d @ d) + self._linear(d)
        return q, self._add_linear_(hd.add_(d, alpha=self.lam))

    def value(self, w: torch.Tensor) -> float:
        d = w - self.w_bar
        quad = float(d @ self.hessian_vec(d)) / 2
        return quad + self.lam / 2 * float(d @ d) + self._linear(d)

    def grad(self, w: torch.Tensor) -> torch.Tensor:
        d = w - self.w_bar
        return self._add_linear_(self.hessian_vec(d).add_(d, alpha=self.lam))

    def lipschitz(self, iters: int = 20, seed: int = 0) -> float:
        """Largest eigenvalue of the Hessian (X^T X / n [block-diag] + lam I), by power
        iteration from a seeded random start; slightly over-estimated (x1.05) for safety."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        v = torch.randn(self.p, generator=gen, dtype=self.dtype).to(self.device)
        v /= v.norm()
        est = 0.0
        for _ in range(iters):
            hv = self.hessian_vec(v)
            est = float(hv.norm())
            if est == 0:
                break
            v = hv / est
        return 1.05 * est + self.lam

    # -- exact minimisation on a support --------------------------------------------------
    def solve_on_support(self, mask: torch.Tensor) -> torch.Tensor:
        """argmin Q(w) subject to w_i = 0 outside ``mask`` (p,) bool; returns w (p,)."""
        return self.solve_with_value(mask)[0]

    def solve_with_value(self, mask: torch.Tensor) -> tuple[torch.Tensor, float]:
        """:meth:`solve_on_support` and Q at its minimiser. The exact (Woodbury) solve gets
        Q from its n-vectors, with no further pass over X; the block solve evaluates Q."""
        m = mask.to(self.device, self.dtype)
        d_fixed = -self.w_bar * (1 - m)  # the change forced on pruned weights
        if self.block_size is not None:
            rhs = -m * self._add_linear_(self.hessian_vec(d_fixed))
            w = m * (self.w_bar + self._block_solve(mask, rhs))
            return w, self.value(w)
        d_T, Xd = self._woodbury(mask, d_fixed)
        sq = float(d_fixed.double().square().sum() + d_T.double().square().sum())
        q = float(Xd @ Xd) / (2 * self.n) + self.lam / 2 * sq
        if self.g is not None:  # alpha g^T d with g the mean row: alpha mean(X d)
            q += self.alpha * float(Xd.mean())
        return m * (self.w_bar + d_T), q

    def support_gram(self, mask: torch.Tensor) -> torch.Tensor:
        """K_T = X_T X_T^T (n, n) float64 for the support ``mask``.

        Costs O(n^2 |changed|): the Gram of the previous call is updated by the columns that
        entered or left the support (IHT changes few), or rebuilt from the full Gram's
        complement when that is cheaper."""
        mask = mask.to(self.device)
        if self._cache.mask is not None:
            added = (mask & ~self._cache.mask).nonzero().flatten()
            removed = (~mask & self._cache.mask).nonzero().flatten()
            if added.numel() + removed.numel() <= min(int(mask.sum()), int((~mask).sum())):
                K = self._cache.gram.clone()
                K += self._gram_of(added)
                K -= self._gram_of(removed)
                self._cache.mask, self._cache.gram = mask.clone(), K
                return K
        kept = mask.nonzero().flatten()
        if kept.numel() <= self.p // 2:
            K = self._gram_of(kept)
        else:
            if self._cache.full is None:
                self._cache.full = self._gram_of(None)
            K = self._cache.full - self._gram_of((~mask).nonzero().flatten())
        self._cache.mask, self._cache.gram = mask.clone(), K
        return K

    def _gram_of(self, idx: torch.Tensor | None) -> torch.Tensor:
        """X[:, idx] X[:, idx]^T (n, n) float64 (all columns when idx is None), in chunks."""
        return self.X.gram(idx)

    def _woodbury(self, mask: torch.Tensor, d_fixed: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """The support part d_T (p,) of the minimiser, without cancellation, and X d (n,)
        float64 for the whole change d = d_fixed + d_T.

        The right-hand side -(H d_fixed + alpha g)_T equals X_T^T r with the n-vector
        r = -(X d_fixed + alpha 1) / n, so (X_T^T X_T / n + lam I)^{-1} X_T^T r
        = X_T^T (K_T + lam n I)^{-1} (n r) with K_T = X_T X_T^T (n x n, float64); and
        X d = X d_fixed + K_T y with y = (K_T + lam n I)^{-1} (n r)."""
        m = mask.to(self.device, self.dtype)
        X_fixed = self.X.matvec(d_fixed).double()
        K_T = self.support_gram(mask.bool())
        K = K_T.clone()
        K.diagonal().add_(self.lam * self.n)
        y = torch.linalg.solve(K, -(X_fixed + self.alpha))  # n * r
        return m * self.X.rmatvec(y.to(self.dtype)), X_fixed + K_T @ y

    def _block_solve(self, mask: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        """Block-diagonal solve: for each block, (X_b^T X_b / n + lam I) restricted to the
        block's support, batched over blocks (Cholesky of B x B matrices)."""
        d = torch.zeros_like(rhs)
        for a, b in self.blocks():
            B = min(self.block_size, b - a)
            Xb = self.X.columns(a, b).reshape(self.n, -1, B).permute(1, 0, 2).double()
            mb = mask[a:b].to(self.device).view(-1, B).double()  # (k, B); Xb is (k, n, B)
            H = Xb.transpose(1, 2) @ Xb / self.n  # (k, B, B)
            H = H * mb[:, :, None] * mb[:, None, :]
            H.diagonal(dim1=1, dim2=2).add_(self.lam)
            r = (rhs[a:b].view(-1, B).double() * mb)[..., None]
            sol = torch.cholesky_solve(r, torch.linalg.cholesky(H))[..., 0] * mb
            d[a:b] = sol.reshape(-1).to(d.dtype)
        return d
