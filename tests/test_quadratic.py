import pytest
import torch

from falcon_prune.errors import ConfigError
from falcon_prune.loss.quadratic import QuadraticModel
from falcon_prune.loss.storage import GradientStore


def problem(n=12, p=40, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, generator=g, dtype=dtype)
    w = torch.randn(p, generator=g, dtype=dtype)
    mask = torch.rand(p, generator=g) < 0.5
    return X, w, mask


def dense_solution(X, w_bar, mask, lam, alpha, block=None):
    n, p = X.shape
    H = X.T @ X / n
    if block is not None:
        keep = torch.zeros_like(H, dtype=torch.bool)
        for a in range(0, p, block):
            keep[a : a + block, a : a + block] = True
        H = H * keep
    H = H + lam * torch.eye(p, dtype=X.dtype)
    g = X.mean(0)
    T = mask.nonzero().flatten()
    d_fixed = -w_bar * (~mask)
    rhs = -(H @ d_fixed + alpha * g)[T]
    d = torch.linalg.solve(H[T][:, T], rhs)
    w = torch.zeros_like(w_bar)
    w[T] = w_bar[T] + d
    return w


@pytest.mark.parametrize("alpha", [0.0, 0.3])
@pytest.mark.parametrize("block", [None, 8, 7])
def test_solve_on_support_matches_dense_solve(alpha, block):
    X, w_bar, mask = problem()
    qm = QuadraticModel(X, w_bar, 1e-2, alpha, block_size=block, chunk=16)
    w = qm.solve_on_support(mask)
    ref = dense_solution(X, w_bar, mask, 1e-2, alpha, block)
    assert torch.allclose(w, ref, atol=1e-8)
    assert torch.all(w[~mask] == 0)
    assert qm.grad(w)[mask].abs().max() < 1e-8  # optimal on the support
    w2, q = qm.solve_with_value(mask)  # Q from the solve's n-vectors (Woodbury)
    assert torch.equal(w2, w) and q == pytest.approx(qm.value(w), rel=1e-10)


def test_woodbury_accurate_for_tiny_ridge_in_float32():
    X, w_bar, mask = problem(n=30, p=300)
    qm = QuadraticModel(X.float(), w_bar.float(), 1e-5)
    w = qm.solve_on_support(mask).double()
    ref = dense_solution(X.float().double(), w_bar.float().double(), mask, 1e-5, 0.0)
    assert (w - ref).norm() / ref.norm() < 1e-3


def test_cached_gram_updates_equal_fresh_ones():
    X, w_bar, _ = problem(n=10, p=64)
    qm = QuadraticModel(X, w_bar, 1e-2, chunk=16)
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(64, generator=g) < 0.7
    for _ in range(5):
        flip = torch.rand(64, generator=g) < 0.05
        mask = mask ^ flip
        K = qm.support_gram(mask)
        XT = X[:, mask]
        assert torch.allclose(K, XT @ XT.T, atol=1e-9)
    # every route to a support's Gram: the full Gram less the complement's, the support's
    # own columns, and updates
    fresh = QuadraticModel(X, w_bar, 1e-2, chunk=16)
    for m in (mask, torch.ones(64, dtype=torch.bool), ~mask, mask, torch.arange(64) < 3):
        XT = X[:, m]
        assert torch.allclose(fresh.support_gram(m), XT @ XT.T, atol=1e-9)


def test_value_and_grad_match_autograd_and_lipschitz_bounds_hessian():
    X, w_bar, _ = problem()
    qm = QuadraticModel(X, w_bar, 0.05, 0.2)
    w = torch.randn(40, dtype=torch.float64, requires_grad=True)
    d = w - w_bar
    q = (X @ d).pow(2).sum() / (2 * 12) + 0.05 / 2 * d @ d + 0.2 * X.mean(0) @ d
    q.backward()
    val, grad = qm.value_and_grad(w.detach())
    assert val == pytest.approx(q.detach().item())
    assert torch.allclose(grad, w.grad)
    top = torch.linalg.eigvalsh(X.T @ X / 12).max() + 0.05
    assert top <= qm.lipschitz(iters=100) <= 1.1 * top


def test_with_ridge_shares_x_and_keeps_alpha():
    X, w_bar, mask = problem()
    qm = QuadraticModel(X, w_bar, 1e-2, 0.3)
    other = qm.with_ridge(1e-1)
    assert other.X is qm.X and other.lam == 1e-1 and other.alpha == 0.3
    ref = dense_solution(X, w_bar, mask, 1e-1, 0.3)
    assert torch.allclose(other.solve_on_support(mask), ref, atol=1e-8)
    assert qm.lam == 1e-2  # the original is unchanged


def test_gradient_store_and_tensor_give_the_same_model():
    X, w_bar, mask = problem()
    a = QuadraticModel(X, w_bar, 1e-2, 0.3)
    b = QuadraticModel(GradientStore.from_tensor(X), w_bar, 1e-2, 0.3)
    assert torch.allclose(a.solve_on_support(mask), b.solve_on_support(mask), atol=1e-12)
    assert a.dtype == torch.float64  # float64 X: float64 compute
    assert QuadraticModel(X.float(), w_bar, 1e-2).dtype == torch.float32


def test_bad_arguments():
    X, w, _ = problem()
    with pytest.raises(ConfigError, match="lam"):
        QuadraticModel(X, w, 0.0)
    with pytest.raises(ConfigError, match="X must be"):
        QuadraticModel(X, w[:-1], 1e-3)
    with pytest.raises(ConfigError, match="X must be"):
        QuadraticModel(X[0], w, 1e-3)
    with pytest.raises(ConfigError, match="alpha"):
        QuadraticModel(X, w, 1e-3, alpha=-1.0)
    with pytest.raises(ConfigError, match="block_size"):
        QuadraticModel(X, w, 1e-3, block_size=0)
