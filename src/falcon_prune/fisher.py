"""The gradient matrix X (n x p): per-sample or per-mini-batch gradients of the loss with
respect to the prunable weights, computed with ``torch.func`` (functional_call + vmap + grad).

The rows of X define the empirical Fisher ``X^T X / n`` of the quadratic model
(METHOD.md section 2). The model is evaluated in eval mode (BatchNorm uses its running
statistics, dropout is off), so a row depends on its own sample(s) only.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from falcon_prune.costs import CostModel

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class MemoryBudgetError(MemoryError):
    """Raised before allocating something that would not fit in the memory limit."""


def available_memory() -> int:
    """Bytes of physical memory currently available (Linux/macOS), or total if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_memory_limit() -> int:
    """The default limit for the gradient matrix and solver buffers: 60 % of available RAM."""
    return int(0.6 * available_memory())


def estimate_bytes(n: int, p: int, dtype: torch.dtype) -> int:
    """Memory of the gradient matrix plus the solver's working copies (one n x n Gram matrix
    in float64 and a handful of p-vectors), in bytes."""
    item = torch.empty((), dtype=dtype).element_size()
    return n * p * item + 8 * n * n * 2 + 16 * p * 8


def check_memory(n: int, p: int, dtype: torch.dtype, limit: int | None) -> int:
    """Refuse (MemoryBudgetError) when the gradient matrix would not fit; returns the estimate."""
    need = estimate_bytes(n, p, dtype)
    limit = default_memory_limit() if limit is None else int(limit)
    if need > limit:
        gib = 2**30
        raise MemoryBudgetError(
            f"the gradient matrix ({n} gradients x {p:,} weights in {dtype}) needs about "
            f"{need / gib:.2f} GiB, over the memory limit of {limit / gib:.2f} GiB. Use fewer "
            f"gradients (n_gradients={max(1, int(n * limit / need))} would fit), "
            "a smaller dtype (float16/bfloat16), or raise memory_limit."
        )
    return need


@dataclass
class SampleSource:
    """Normalised access to the user's data: (inputs, targets) tensors on the CPU."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.x)


def as_samples(data: object, needed: int | None = None, seed: int = 0) -> SampleSource:
    """Collect (x, y) from a ``(x, y)`` tuple of tensors, a ``Dataset`` of (x, y) pairs (a
    seeded random subset when ``needed`` is given) or an iterable of (x, y) batches (taken
    in order). Raises ``ValueError`` when the data has another form or too few samples."""
    if (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and all(isinstance(t, torch.Tensor) for t in data)
    ):
        x, y = data
        if len(x) != len(y):
            raise ValueError(f"inputs and targets differ in length: {len(x)} vs {len(y)}")
    elif isinstance(data, Dataset) and hasattr(data, "__len__"):
        n = len(data)
        if needed is not None and needed > n:
            raise ValueError(
                f"asked for {needed} samples but the data set has only {n}; lower n_gradients "
                "(or samples per gradient) or pass more data"
            )
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(n, generator=g)[: needed if needed is not None else n]
        xs, ys = zip(*(_pair(data[int(i)]) for i in idx), strict=True)
        x, y = torch.stack(xs), torch.stack([torch.as_tensor(t) for t in ys])
    elif isinstance(data, (DataLoader, Iterable)):
        xs, ys, have = [], [], 0
        for batch in data:
            bx, by = _pair(batch)
            xs.append(bx)
            ys.append(torch.as_tensor(by))
            have += len(bx)
            if needed is not None and have >= needed:
                break
        if not xs:
            raise ValueError("the data loader yielded no batches")
        x, y = torch.cat(xs), torch.cat(ys)
    else:
        raise TypeError(
            "data must be an (inputs, targets) tuple of tensors, a Dataset of (x, y) pairs or "
            f"an iterable of (x, y) batches; got {type(data).__name__}"
        )
    if needed is not None:
        if len(x) < needed:
            raise ValueError(
                f"asked for {needed} samples but the data has only {len(x)}; lower n_gradients "
                "(or samples per gradient) or pass more data"
            )
        x, y = x[:needed], y[:needed]
    if not torch.is_floating_point(x):
        raise ValueError(f"inputs must be floating point tensors, got {x.dtype}")
    return SampleSource(x, y)


def _pair(item: object) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(item, (tuple, list)) and len(item) >= 2:
        return torch.as_tensor(item[0]), torch.as_tensor(item[1])
    raise ValueError(f"each data item must be an (input, target) pair, got {type(item).__name__}")


def gradient_matrix(
    model: nn.Module,
    cost_model: CostModel,
    samples: SampleSource,
    n_gradients: int,
    samples_per_gradient: int = 1,
    loss_fn: LossFn | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    chunk: int = 64,
    memory_limit: int | None = None,
    progress: bool = True,
    columns: torch.Tensor | None = None,
) -> torch.Tensor:
    """X (n_gradients, p) in ``dtype`` on ``device``: row j is the gradient of the mean loss
    over samples ``j*m .. j*m+m-1`` (m = samples_per_gradient) at the current weights.
    With ``columns`` (int64 indices into the flat weights) only those columns are kept,
    X is (n_gradients, len(columns)) and the memory check counts only them.

    The memory estimate is checked before X is allocated. Raises ``ValueError`` when the
    model/data shapes disagree or a gradient is NaN/inf.
    """
    if not isinstance(n_gradients, int) or n_gradients < 1:
        raise ValueError(f"n_gradients must be a positive integer, got {n_gradients!r}")
    if not isinstance(samples_per_gradient, int) or samples_per_gradient < 1:
        raise ValueError(
            f"samples_per_gradient must be a positive integer, got {samples_per_gradient!r}"
        )
    m = samples_per_gradient
    if n_gradients * m > len(samples):
        raise ValueError(
            f"{n_gradients} gradients x {m} samples each need {n_gradients * m} samples, but "
            f"the data has {len(samples)}; lower n_gradients or pass more data"
        )
    p = cost_model.num_weights if columns is None else int(columns.numel())
    check_memory(n_gradients, p, dtype, memory_limit)
    loss_fn = loss_fn or F.cross_entropy
    names = [lay.name + ".weight" for lay in cost_model.layers]
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(
            f"prunable weights {missing[:3]} are not plain parameters of the model (remove "
            "torch.nn.utils.prune re-parametrisations first, e.g. with falcon_prune.make_permanent)"
        )
    fixed = {k: v.detach() for k, v in params.items() if k not in names}
    fixed.update(dict(model.named_buffers()))
    weights = {k: params[k].detach() for k in names}

    def loss_of(w: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, {**fixed, **w}, (xb,))
        return loss_fn(out, yb)

    per_row = vmap(grad(loss_of), in_dims=(None, 0, 0))
    X = torch.empty((n_gradients, p), dtype=dtype, device=device)
    was_training = model.training
    model.eval()
    rows_per_chunk = max(1, chunk // m)
    try:
        bar = tqdm(total=n_gradients, desc="gradients", unit="grad", disable=not progress)
        for start in range(0, n_gradients, rows_per_chunk):
            stop = min(n_gradients, start + rows_per_chunk)
            xb = samples.x[start * m : stop * m].to(device)
            yb = samples.y[start * m : stop * m].to(device)
            xb = xb.reshape(stop - start, m, *xb.shape[1:])
            yb = yb.reshape(stop - start, m, *yb.shape[1:])
            try:
                g = per_row(weights, xb, yb)
            except RuntimeError as e:
                raise ValueError(
                    f"the model could not be evaluated on the data ({e}); check that the inputs "
                    f"have the shape the model expects (got {tuple(samples.x.shape[1:])} per "
                    "sample) and that the targets fit the loss"
                ) from e
            rows = torch.cat([g[k].reshape(stop - start, -1) for k in names], dim=1)
            if columns is not None:
                rows = rows[:, columns.to(rows.device)]
            if not torch.isfinite(rows).all():
                raise ValueError(
                    f"gradients {start}..{stop - 1} contain NaN or inf: check the data "
                    "(NaN/inf inputs, labels out of range) and the model's weights"
                )
            X[start:stop] = rows.to(dtype)
            bar.update(stop - start)
        bar.close()
    finally:
        model.train(was_training)
    return X
