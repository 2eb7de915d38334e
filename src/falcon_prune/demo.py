"""The embedded demo: a small CNN trained in seconds on scikit-learn's bundled 8x8 digits
(no download), pruned to a FLOP budget with several methods and compared."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from falcon_prune.api import prune
from falcon_prune.data.evaluation import accuracy
from falcon_prune.errors import DependencyError


class DigitsNet(nn.Module):
    """Conv(1->16) - Conv(16->32) - pool - Conv(32->32) - global pool - Linear(32->10) on
    (1, 8, 8) images: convolutions on different resolutions, so FLOP costs differ by layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.conv3(x))
        return self.fc(x.mean((2, 3)))


def load_digits_split(seed: int = 0):
    """((x_train, y_train), (x_test, y_test)): 1,347 / 450 images (1, 8, 8) scaled to [0, 1]
    then standardised, from scikit-learn's bundled copy."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise DependencyError(
            "the demo needs scikit-learn: pip install 'falcon-prune[demo]'"
        ) from e
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    return (x[:1347], y[:1347]), (x[1347:], y[1347:])


def train_digits(seed: int = 0, epochs: int = 40) -> tuple[nn.Module, tuple, tuple]:
    """Train DigitsNet with Adam (epochs of mini-batches of 64); seconds on a CPU. The
    caller's global RNG state is left as it was."""
    train, test = load_digits_split(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsNet()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(train[0]), generator=g)
        for a in range(0, len(perm), 64):
            idx = perm[a : a + 64]
            loss = F.cross_entropy(model(train[0][idx]), train[1][idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval(), train, test


def run_demo(
    flops: float = 0.3, methods: tuple[str, ...] = ("mp", "mp_flops", "falcon"), seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """Train, prune with each method at ``flops`` (fraction kept), print and return rows."""
    t = time.perf_counter()
    model, train, test = train_digits(seed)
    print(
        f"trained DigitsNet on 1,347 digits in {time.perf_counter() - t:.1f}s: "
        f"dense test accuracy {accuracy(model, test):.4f} on {len(test[0])} images"
    )
    rows = []
    for method in methods:
        kw = {"n_gradients": 500, "n_validation": 500} if method == "falcon" else {}
        r = prune(model, train, flops=flops, method=method, seed=seed, progress=progress, **kw)
        rows.append({
            "method": method, "accuracy": accuracy(r.model, test),
            "flops_fraction": r.flops_fraction, "nnz_fraction": r.nnz_fraction,
            "seconds": r.times["total"],
        })
    print(f"\npruned to {flops:.0%} of the FLOPs (no fine-tuning):")
    print(f"{'method':<10} {'accuracy':>9} {'FLOPs kept':>11} {'weights kept':>13} {'seconds':>8}")
    for row in rows:
        print(f"{row['method']:<10} {row['accuracy']:>9.4f} {row['flops_fraction']:>11.4f} "
              f"{row['nnz_fraction']:>13.4f} {row['seconds']:>8.1f}")
    return rows
