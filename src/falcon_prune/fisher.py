"""The gradient matrix X (n x p): per-sample or per-mini-batch gradients of the loss with
respect to the prunable weights, computed with ``torch.func`` (functional_call + vmap + grad).

The rows of X define the empirical Fisher ``X^T X / n`` of the quadratic model
(METHOD.md section 2). The model is evaluated in eval mode (BatchNorm uses its running
statistics, dropout is off), so a row depends on its own sample(s) only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from falcon_prune.costs import CostModel
from falcon_prune.storage import (  # noqa: F401  (re-exported: the historical home)
    GradientStore,
    MemoryBudgetError,
    StoragePlan,
    available_memory,
    default_memory_limit,
    estimate_bytes,
    plan_storage,
)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class SampleSource:
    """Normalised access to the user's data: (inputs, targets) tensors on the CPU."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.x)


def as_samples(
    data: object, needed: int | None = None, seed: int = 0, minimum: int | None = None
) -> SampleSource:
    """Collect (x, y) from a ``(x, y)`` tuple of tensors, a ``Dataset`` of (x, y) pairs (a
    seeded random subset when ``needed`` is given) or an iterable of (x, y) batches (taken
    in order): up to ``needed`` samples, and at least ``minimum`` (default ``needed``).
    Raises ``ValueError`` when the data has another form or fewer than ``minimum``."""
    minimum = needed if minimum is None else minimum
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
        if minimum is not None and minimum > n:
            raise ValueError(
                f"asked for {minimum} samples but the data set has only {n}; lower n_gradients "
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
    if minimum is not None and len(x) < minimum:
        raise ValueError(
            f"asked for {minimum} samples but the data has only {len(x)}; lower n_gradients "
            "(or samples per gradient) or pass more data"
        )
    if needed is not None:
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
    """X (n_gradients, p) as one in-memory tensor in ``dtype`` on ``device``: row j is the
    gradient of the mean loss over samples ``j*m .. j*m+m-1`` (m = samples_per_gradient) at
    the current weights. With ``columns`` (int64 indices into the flat weights) only those
    columns are kept. See :func:`gradient_store` for the arguments and errors; this is its
    ``storage='memory'`` form (refused with :class:`MemoryBudgetError` when it won't fit)."""
    store = gradient_store(model, cost_model, samples, n_gradients, samples_per_gradient,
                           loss_fn, dtype, device, chunk, memory_limit, progress, columns,
                           storage="memory")
    return store.data if store.row_scale is None else store.to_tensor().to(dtype)


def gradient_store(
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
    storage: str = "auto",
    scratch_dir: str | None = None,
    plan: StoragePlan | None = None,
) -> GradientStore:
    """The gradient matrix X (n_gradients, p) in a :class:`GradientStore`.

    Row j is the gradient of the mean loss over samples ``j*m .. j*m+m-1``
    (m = ``samples_per_gradient``) at the model's current weights, in eval mode, computed
    with ``torch.func`` (vmap over grad of functional_call), at most ``chunk`` samples per
    vmap call (fewer when a chunk of per-sample gradients would take more than an eighth of
    the memory limit). With ``columns`` (sorted int64 indices into the flat weights) only
    those columns are kept and counted.

    Where X lives comes from ``plan`` or :func:`~falcon_prune.storage.plan_storage`
    (``storage``, ``dtype``, ``memory_limit`` in bytes, ``scratch_dir``), decided before
    anything is allocated. Raises ``ValueError`` when model and data disagree in shape or a
    gradient is NaN/inf, and ``MemoryBudgetError`` when X cannot be stored within the limit.
    """
    if isinstance(n_gradients, bool) or not isinstance(n_gradients, int) or n_gradients < 1:
        raise ValueError(f"n_gradients must be a positive integer, got {n_gradients!r}")
    if (isinstance(samples_per_gradient, bool) or not isinstance(samples_per_gradient, int)
            or samples_per_gradient < 1):
        raise ValueError(
            f"samples_per_gradient must be a positive integer, got {samples_per_gradient!r}"
        )
    m = samples_per_gradient
    if n_gradients * m > len(samples):
        raise ValueError(
            f"{n_gradients} gradients x {m} samples each need {n_gradients * m} samples, but "
            f"the data has {len(samples)}; lower n_gradients or pass more data"
        )
    p_all = cost_model.num_weights
    p = p_all if columns is None else int(columns.numel())
    if plan is None:
        plan = plan_storage(n_gradients, p, dtype, storage, memory_limit, scratch_dir)
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
    # a vmap call holds its per-sample gradients twice (the dict and the assembled rows)
    row_bytes = 2 * p_all * 4
    rows_per_chunk = max(1, min(max(1, chunk // m), (plan.limit // 8) // row_bytes))
    store = GradientStore.from_plan(n_gradients, p, plan, device)
    store.plan = plan
    was_training = model.training
    model.eval()
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
            rows = torch.cat([g.pop(k).reshape(stop - start, -1) for k in names], dim=1)
            del g
            if columns is not None:
                rows = rows[:, columns.to(rows.device)]
            # the sum is finite unless an entry is NaN/inf (or huge): a cheap first test
            if not torch.isfinite(rows.sum()) and not torch.isfinite(rows).all():
                raise ValueError(
                    f"gradients {start}..{stop - 1} contain NaN or inf: check the data "
                    "(NaN/inf inputs, labels out of range) and the model's weights"
                )
            store.write_rows(start, rows)
            del rows
            bar.update(stop - start)
        bar.close()
    finally:
        model.train(was_training)
    return store
