"""The gradient matrix X (n x p): per-sample or per-mini-batch gradients of the task's loss
with respect to the prunable weights, computed with ``torch.func`` (vmap over grad of
functional_call).

The rows of X define the empirical Fisher ``X^T X / n`` of the quadratic model
(docs/method.md). The model runs in eval mode (BatchNorm uses its running statistics,
dropout is off), so a row depends on its own samples only. vmap maps over the first
dimension of every tensor of the batch (inputs and targets alike, integer token ids
included). Attention runs through PyTorch's math backend and recurrent layers unrolled
(:mod:`falcon_prune.analysis.recurrent`) while gradients are taken, so that vmap batches them
instead of looping over samples. A model that cannot run under vmap (Python control flow
on tensor values, ``.item()``) gets its rows from a plain backward pass per row instead,
and the run says so.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from falcon_prune.analysis.costs import CostModel, plain_kernels
from falcon_prune.analysis.recurrent import unrolled_recurrent
from falcon_prune.data.batches import Batch, Samples, leaves, map_tensors, rebuild, to_device
from falcon_prune.data.tasks import Task, TaskRunner, as_task, batch_mean
from falcon_prune.errors import ConfigError, DataError, MemoryBudgetError, ModelError
from falcon_prune.loss.distributed import Ranks, ShardedStore
from falcon_prune.loss.planning import StoragePlan, plan_storage
from falcon_prune.loss.storage import GradientStore

VMAP = "torch.func.vmap"
#: the most bytes of per-sample gradients one vmap call holds (counted twice: the
#: per-parameter results and the assembled rows); ResNet50: 1 sample, MobileNetV1: 3,
#: ResNet20: 62
CHUNK_BYTES = 128 * 2**20


def _positive(name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    return v


class _Rows:
    """Computes the gradient rows of chunks of samples: by vmap, or by a loop of plain
    backward passes (``mode``), for the weights ``names`` of ``model``."""

    def __init__(self, model: nn.Module, names: list[str], task: Task,
                 precision: torch.dtype | None = None):
        self.model, self.names, self.task = model, names, task
        self.precision = precision
        self.runner = TaskRunner(model, task)
        params = dict(model.named_parameters(remove_duplicate=False))  # tied: every name
        missing = [n for n in names if n not in params]
        if missing:
            raise ModelError(
                f"prunable weights {missing[:3]} are not plain parameters of the model (fold "
                "torch.nn.utils.prune masks first, e.g. with falcon_prune.make_permanent)")
        self.weights = {"model." + k: params[k].detach() for k in names}
        variables = {id(params[k]) for k in names}  # a tied weight: one name, tied by call
        self.fixed = {"model." + k: v.detach() for k, v in model.named_parameters()
                      if id(v) not in variables}
        self.fixed.update({"model." + k: v for k, v in model.named_buffers()})
        if precision is not None:  # the forward and backward in that dtype
            self.weights = {k: v.to(precision) for k, v in self.weights.items()}
            self.fixed = {k: v.to(precision) if v.is_floating_point() else v
                          for k, v in self.fixed.items()}
        self.mode = VMAP

    def _loss(self, w: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        pred, targets = functional_call(self.runner, {**self.fixed, **w}, (batch,))
        return batch_mean(self.task.losses(pred, targets))

    def by_vmap(self, rows: Batch, m: int) -> torch.Tensor:
        """(r, p) rows for a batch of r*m samples, m per row."""
        parts = [t.reshape(t.shape[0] // m, m, *t.shape[1:]) for t in leaves(rows)]

        def loss_of(w, parts):
            return self._loss(w, rebuild(rows, parts))

        g = vmap(grad(loss_of), in_dims=(None, [0] * len(parts)))(self.weights, parts)
        r = parts[0].shape[0]
        return torch.cat([g.pop("model." + k).reshape(r, -1) for k in self.names], dim=1)

    def by_loop(self, rows: Batch, m: int) -> torch.Tensor:
        """The same rows, one plain backward pass per row."""
        w = {k: v.clone().requires_grad_(True) for k, v in self.weights.items()}
        n = leaves(rows)[0].shape[0]
        out = []
        for a in range(0, n, m):
            part = map_tensors(rows, lambda t, a=a: t[a : a + m])
            with torch.enable_grad():
                gs = torch.autograd.grad(self._loss(w, part), list(w.values()),
                                         allow_unused=True)
            out.append(torch.cat([torch.zeros(v.numel(), dtype=v.dtype, device=v.device)
                                  if g is None else g.reshape(-1)
                                  for g, v in zip(gs, w.values(), strict=True)]))
        return torch.stack(out)

    def __call__(self, rows: Batch, m: int) -> torch.Tensor:
        if self.precision is None:
            return self._rows(rows, m)
        low = map_tensors(rows, lambda t: t.to(self.precision) if t.is_floating_point() else t)
        try:
            return self._rows(low, m)  # the store remembers they are bfloat16 values
        except (RuntimeError, TypeError, DataError) as e:
            raise ConfigError(
                f"the gradient rows could not be computed in {self.precision} ({e}); if the "
                "model runs in float32, pass gradient_precision='model'") from e

    def _rows(self, rows: Batch, m: int) -> torch.Tensor:
        with plain_kernels(self.model), unrolled_recurrent(self.model):
            if self.mode == VMAP:
                lean = _without_full_mask(rows)
                for batch in ((lean, rows) if lean is not rows else (rows,)):
                    try:
                        return self.by_vmap(batch, m)
                    except (RuntimeError, ValueError, TypeError, IndexError) as e:
                        vmap_error = e
                self._fall_back(rows, m, vmap_error)
            return self.by_loop(rows, m)

    def _fall_back(self, rows: Batch, m: int, vmap_error: Exception) -> None:
        """vmap failed: if a plain backward pass works, use loops from now on (the model
        cannot run under vmap); else the model cannot run on the data at all."""
        try:
            self.by_loop(map_tensors(rows, lambda t: t[:m]), m)
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            raise DataError(
                f"the model could not be evaluated on the data ({e}); check that the inputs "
                "have the shape the model expects and that the targets fit the task's loss"
            ) from e
        first = str(vmap_error).strip().splitlines()[0][:200]
        self.mode = f"a backward pass per row (the model does not run under vmap: {first})"


def _without_full_mask(batch: Batch) -> Batch:
    """A dict batch without its ``attention_mask`` when that attends to every position:
    the same computation (no mask means attend everywhere), and HuggingFace models then
    skip the Python check on the mask's values that ``vmap`` cannot run."""
    if isinstance(batch, Mapping) and isinstance(batch.get("attention_mask"), torch.Tensor) \
            and bool(batch["attention_mask"].all()):
        return {k: v for k, v in batch.items() if k != "attention_mask"}
    return batch


def gradient_store(
    model: nn.Module,
    cost_model: CostModel,
    samples: Samples,
    n_gradients: int,
    samples_per_gradient: int = 1,
    task: Task | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    chunk: int = 64,
    memory_limit: int | None = None,
    progress: bool = True,
    columns: torch.Tensor | None = None,
    storage: str = "auto",
    scratch_dir: str | None = None,
    plan: StoragePlan | None = None,
    on_mode: Callable[[str], None] | None = None,
    ranks: Ranks | None = None,
    precision: torch.dtype | None = None,
) -> GradientStore | ShardedStore:
    """The gradient matrix X (n_gradients, p) in a :class:`GradientStore`.

    Row j is the gradient of the mean loss (of ``task``, default classification) over
    samples ``j*m .. j*m+m-1`` (m = ``samples_per_gradient``) at the model's current
    weights, in eval mode, at most ``chunk`` samples per vmap call (fewer when a chunk of
    per-sample gradients would take more than ``CHUNK_BYTES`` or an eighth of the memory
    limit: larger chunks are no faster, and their activations add to the peak). With
    ``columns`` (sorted int32 or int64 indices into the flat weights) only those columns are kept.
    ``on_mode(text)`` is told how the rows were computed (vmap, or the per-row fallback).
    With ``ranks`` of more than one process (default: the initialised ``torch.distributed``
    group, if any; :mod:`falcon_prune.loss.distributed`), this process computes and stores only
    its share of the rows and a :class:`ShardedStore` is returned; every rank must call
    this with the same samples. ``precision`` (e.g. torch.bfloat16): the forward and
    backward run with the weights, buffers and floating inputs in that dtype (None: as
    they are); the rows are stored in ``dtype``.

    Where X lives comes from ``plan`` or :func:`~falcon_prune.storage.plan_storage`
    (``storage``, ``dtype``, ``memory_limit`` in bytes, ``scratch_dir``), decided before
    anything is allocated. Raises DataError when model and data disagree or a gradient is
    NaN/inf or every gradient is zero, and MemoryBudgetError when X cannot be stored."""
    ranks = Ranks.current() if ranks is None else ranks
    m = _check_counts(n_gradients, samples_per_gradient, len(samples), ranks)
    p = cost_model.num_weights if columns is None else int(columns.numel())
    if plan is None:
        plan = _agreed_plan(n_gradients, p, dtype, storage, memory_limit, scratch_dir, ranks)
    rows_fn = _Rows(model, [lay.name for lay in cost_model.layers], as_task(task), precision)
    # a vmap call holds its per-sample gradients twice (the dict and the assembled rows)
    per_chunk = max(1, min(max(1, chunk // m), min(plan.limit // 8, CHUNK_BYTES)
                           // (2 * cost_model.num_weights * 4)))
    store = _empty_store(n_gradients, p, plan, device, ranks)
    was = model.training
    model.eval()
    try:
        _fill(store, rows_fn, samples, ranks.bounds(n_gradients), m, per_chunk, device,
              columns, progress, ranks)
    finally:
        model.train(was)
    if on_mode is not None:
        on_mode(rows_fn.mode)
    return store


def _check_counts(n_gradients: int, samples_per_gradient: int, available: int,
                  ranks: Ranks) -> int:
    """Refuse counts that cannot be met; returns the samples per gradient."""
    m = _positive("samples_per_gradient", samples_per_gradient)
    _positive("n_gradients", n_gradients)
    if n_gradients * m > available:
        raise DataError(
            f"{n_gradients} gradients x {m} samples each need {n_gradients * m} samples, but "
            f"the data has {available}; lower n_gradients or pass more data")
    if n_gradients < ranks.world:
        raise ConfigError(f"n_gradients={n_gradients} is fewer than the {ranks.world} "
                          "processes that share the gradient matrix; raise n_gradients")
    return m


def _agreed_plan(n: int, p: int, dtype: torch.dtype, storage: str, memory_limit: int | None,
                 scratch_dir: str | None, ranks: Ranks) -> StoragePlan:
    """This rank's storage plan; when any rank cannot store its share, every rank raises
    MemoryBudgetError (a rank that went on would wait for the others in a collective)."""
    try:
        plan, refusal = plan_storage(n, p, dtype, storage, memory_limit, scratch_dir,
                                     ranks.world), None
    except MemoryBudgetError as e:
        plan, refusal = None, e
    ranks.raise_together(refusal, MemoryBudgetError(
        "another process of the torch.distributed group cannot store its share of the "
        "gradient matrix (its message says why and what to change); every rank stops"))
    return plan


def _empty_store(n: int, p: int, plan: StoragePlan, device, ranks: Ranks
                 ) -> GradientStore | ShardedStore:
    """Room for this rank's share of the n rows of X (all of them for one process), as
    ``plan`` says."""
    start, stop = ranks.bounds(n)
    store = GradientStore.from_plan(stop - start, p, plan, device)
    store.plan = plan
    return ShardedStore(store, n, ranks) if ranks.active else store


def _fill(store: GradientStore | ShardedStore, rows_fn: _Rows, samples: Samples,
          span: tuple[int, int], m: int, per_chunk: int, device, columns: torch.Tensor | None,
          progress: bool, ranks: Ranks) -> None:
    """Compute rows [first, last) = ``span`` chunk by chunk and write them into ``store``."""
    seen_nonzero, bad = False, None
    first, last = span
    bar = tqdm(total=last - first, desc="gradients" + (f" (rank 0 of {ranks.world})"
                                                      if ranks.active else ""),
               unit="grad", disable=not progress)
    for start in range(first, last, per_chunk):
        stop = min(last, start + per_chunk)
        batch = to_device(samples.take(slice(start * m, stop * m)).batch, device)
        rows = rows_fn(batch, m)
        if columns is not None:
            rows = rows[:, columns.to(rows.device)]
        # the sum is finite unless an entry is NaN/inf (or huge): a cheap first test
        if not torch.isfinite(rows.sum()) and not torch.isfinite(rows).all():
            bad = f"gradients {start}..{stop - 1} contain NaN or inf"
            break
        seen_nonzero = seen_nonzero or bool(rows.any())
        store.write_rows(start, rows)
        bar.update(stop - start)
    bar.close()
    if ranks.active:  # every rank must take the same branch
        nonzero, bads = ranks.all_sum(torch.tensor([float(seen_nonzero), float(bad is not None)]))
        seen_nonzero = bool(nonzero > 0)
        bad = bad or ("the gradients of another process contain NaN or inf" if bads else None)
    if bad is not None:
        raise DataError(f"{bad}: check the data (NaN/inf inputs, labels out of range) and the "
                        "model's weights")
    if not seen_nonzero:
        raise DataError(
            "every gradient is zero: the task's loss does not depend on the prunable weights "
            "(a constant loss, e.g. cross-entropy over one output); check the task")


def gradient_matrix(model: nn.Module, cost_model: CostModel, samples: Samples,
                    n_gradients: int, samples_per_gradient: int = 1, task: Task | None = None,
                    dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                    **kw) -> torch.Tensor:
    """X (n_gradients, p) as one in-memory tensor in ``dtype`` on ``device``; the
    ``storage='memory'`` form of :func:`gradient_store` (same arguments), refused with
    MemoryBudgetError when it won't fit."""
    store = gradient_store(model, cost_model, samples, n_gradients, samples_per_gradient,
                           task, dtype, device, storage="memory", **kw)
    if isinstance(store, ShardedStore) or store.row_scale is not None:
        return store.to_tensor().to(dtype)
    return store.data
