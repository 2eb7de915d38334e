"""The one-call API: ``prune(model, data, flops=..., nnz=..., method=...)``.

Budgets are fractions of the dense model that are *kept*: ``flops=0.3`` keeps at most 30 % of
the multiply-accumulates of the prunable layers, ``nnz=0.5`` at most half of their weights.
The user's model is never modified: the pruned network is a copy whose prunable weights carry
``torch.nn.utils.prune`` masks (``make_permanent`` folds them into plain weights).
"""

from __future__ import annotations

import copy
import math
import resource
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.utils import prune as torch_prune

from falcon_prune.costs import CostModel, find_prunable_modules, flatten_weights
from falcon_prune.fisher import LossFn, SampleSource, as_samples, gradient_matrix
from falcon_prune.ilp import CostGroups
from falcon_prune.quadratic import QuadraticModel
from falcon_prune.solvers import (
    METHODS,
    NEEDS_GRADIENTS,
    Budget,
    SolverOptions,
    SolverResult,
    chita,
    falcon,
    magnitude,
    magnitude_flops,
    woodfisher,
)

DEFAULT_RIDGE = 1e-3


@dataclass
class LayerReport:
    """One prunable layer after pruning; MACs are per input sample."""

    name: str
    kind: str
    weights: int
    kept: int
    macs_dense: float
    macs_kept: float


@dataclass
class PruneResult:
    """What ``prune`` returns.

    ``model`` is the pruned copy (masks through ``torch.nn.utils.prune``); ``flops_fraction``
    and ``nnz_fraction`` are the kept fractions, recounted from the returned weights;
    ``times`` are seconds per phase; ``peak_rss_mb`` is the process's peak resident memory
    at the end (MiB); ``details`` holds solver information (chosen ridge and warm start,
    iterations, candidate scores)."""

    model: nn.Module
    method: str
    flops_budget: float | None
    nnz_budget: float | None
    flops_fraction: float
    nnz_fraction: float
    dense_macs: float
    num_weights: int
    layers: list[LayerReport]
    ilp_gap: float | None
    ilp_upper_bound: float | None
    times: dict[str, float]
    peak_rss_mb: float
    details: dict = field(default_factory=dict)

    def table(self) -> str:
        """The per-layer report as fixed-width text."""
        head = f"{'layer':<28} {'kind':<7} {'weights':>9} {'kept':>9} {'MACs dense':>12} "
        head += f"{'MACs kept':>12} {'kept %':>7}"
        rows = [head, "-" * len(head)]
        for r in self.layers:
            pct = 100 * r.kept / r.weights if r.weights else 0.0
            rows.append(
                f"{r.name[:28]:<28} {r.kind:<7} {r.weights:>9,} {r.kept:>9,} "
                f"{r.macs_dense:>12,.0f} {r.macs_kept:>12,.0f} {pct:>6.1f}%"
            )
        return "\n".join(rows)

    def summary(self) -> str:
        """A few lines: budgets, achieved fractions, gap and times."""
        fb = "-" if self.flops_budget is None else f"{self.flops_budget:.3f}"
        nb = "-" if self.nnz_budget is None else f"{self.nnz_budget:.3f}"
        gap = "-" if self.ilp_gap is None else f"{self.ilp_gap:.3g}"
        times = ", ".join(f"{k} {v:.1f}s" for k, v in self.times.items())
        return (
            f"method {self.method}: FLOPs kept {self.flops_fraction:.4f} (budget {fb}), "
            f"weights kept {self.nnz_fraction:.4f} (budget {nb}), ILP gap {gap}\n"
            f"time: {times}; peak memory {self.peak_rss_mb:.0f} MiB"
        )

    def to_dict(self) -> dict:
        """JSON-ready dictionary (without the model)."""
        return {
            "method": self.method,
            "flops_budget": self.flops_budget,
            "nnz_budget": self.nnz_budget,
            "flops_fraction": self.flops_fraction,
            "nnz_fraction": self.nnz_fraction,
            "dense_macs": self.dense_macs,
            "num_weights": self.num_weights,
            "ilp_gap": self.ilp_gap,
            "ilp_upper_bound": self.ilp_upper_bound,
            "times": self.times,
            "peak_rss_mb": self.peak_rss_mb,
            "details": self.details,
            "layers": [vars(r) for r in self.layers],
        }


# -- validation ---------------------------------------------------------------------------
def check_fraction(name: str, value: object) -> float | None:
    """A budget fraction in (0, 1] or None; anything else raises with the fix."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{name} must be a number in (0, 1] (the fraction of the dense model to keep) or "
            f"None, got {type(value).__name__} {value!r}"
        )
    v = float(value)
    if math.isnan(v) or not 0 < v <= 1:
        raise ValueError(
            f"{name}={value!r} is not a fraction in (0, 1]: it is the fraction of the dense "
            f"model to keep (e.g. {name}=0.3 keeps 30 %)"
        )
    return v


def _check_args(method: str, n_gradients: object, samples_per_gradient: object) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    for name, v in (("n_gradients", n_gradients), ("samples_per_gradient", samples_per_gradient)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


def _data_length(data: object) -> int | None:
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        return len(data[0])
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:
        return None


# -- masks --------------------------------------------------------------------------------
def make_permanent(model: nn.Module) -> nn.Module:
    """Fold every ``torch.nn.utils.prune`` mask into a plain ``weight`` parameter (in place);
    returns the model."""
    for module in model.modules():
        if torch_prune.is_pruned(module) and hasattr(module, "weight_orig"):
            torch_prune.remove(module, "weight")
    return model


def clone_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that also works when it carries ``torch.nn.utils.prune``
    masks (whose computed ``weight`` tensors refuse deepcopy); ``model`` is left as it was."""
    stash = []
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, torch_prune.BasePruningMethod):
                name = hook._tensor_name
                stash.append((module, name, getattr(module, name)))
                setattr(module, name, getattr(module, name).detach())
    try:
        return copy.deepcopy(model)
    finally:
        for module, name, value in stash:
            setattr(module, name, value)


def _unmask(model: nn.Module) -> None:
    """Turn masked weights of a previously pruned model into plain (zero-holding) weights."""
    make_permanent(model)


def apply_weights(cost_model: CostModel, w: torch.Tensor, mask: torch.Tensor) -> None:
    """Write flat weights ``w`` (p,) into the layers and attach ``mask`` (p,) bool as
    ``torch.nn.utils.prune`` masks, so fine-tuning keeps pruned weights at zero."""
    for lay, wl, ml in zip(cost_model.layers, cost_model.split(w), cost_model.split(mask),
                           strict=True):
        with torch.no_grad():
            lay.module.weight.copy_(wl.to(lay.module.weight.dtype) * ml)
        torch_prune.custom_from_mask(lay.module, "weight", ml.to(lay.module.weight.device))


def masks_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """{layer name: bool mask} of every pruned layer (non-zero pattern if no prune mask)."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "weight_mask"):
            out[name] = module.weight_mask.detach().bool().clone()
    return out


# -- the call -----------------------------------------------------------------------------
def prune(
    model: nn.Module,
    data: object,
    flops: float | None = None,
    nnz: float | None = None,
    method: str = "falcon",
    n_gradients: int = 1000,
    samples_per_gradient: int = 1,
    n_validation: int = 1000,
    ridge: float = DEFAULT_RIDGE,
    alpha: float = 0.0,
    block_size: int | None = None,
    options: SolverOptions | None = None,
    loss_fn: LossFn | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    memory_limit: int | None = None,
    example_input: torch.Tensor | None = None,
    seed: int = 0,
    progress: bool = True,
) -> PruneResult:
    """Prune a copy of ``model`` so that at most ``flops`` of its multiply-accumulates and at
    most ``nnz`` of its prunable weights are kept (fractions in (0, 1]; None: no limit; at
    least one budget is required).

    ``data``: an (inputs, targets) tuple of tensors, a Dataset of (x, y) pairs or a loader of
    (x, y) batches. The first ``n_gradients * samples_per_gradient`` samples give the
    gradient matrix (methods woodfisher, chita, falcon); up to ``n_validation`` further
    samples, when the data has them, let ``falcon`` choose its ridge and warm start by their
    loss (otherwise it uses Q with ``ridge``). ``ridge`` is lam and ``alpha`` the
    first-order scale of the quadratic model; ``block_size`` switches to the block-diagonal
    approximation. Raises ``ValueError``/``TypeError`` on bad input and
    ``falcon_prune.MemoryBudgetError`` when the gradient matrix would exceed
    ``memory_limit`` bytes (default 60 % of available RAM); the user's model is untouched in
    every case.
    """
    t_start = time.perf_counter()
    flops = check_fraction("flops", flops)
    nnz = check_fraction("nnz", nnz)
    if flops is None and nnz is None:
        raise ValueError("give at least one budget: flops=<fraction kept> and/or nnz=<fraction>")
    _check_args(method, n_gradients, samples_per_gradient)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not find_prunable_modules(model):
        raise ValueError(
            f"{type(model).__name__} has no prunable layers (Conv1d/Conv2d/Conv3d/Linear); "
            "nothing to prune."
        )
    if not ridge > 0:
        raise ValueError(f"ridge must be > 0, got {ridge!r}")
    torch.manual_seed(seed)
    needs_grad = method in NEEDS_GRADIENTS
    n_fit = n_gradients * samples_per_gradient if needs_grad else 1
    total = _data_length(data)
    want = n_fit + (n_validation if method == "falcon" else 0)
    if total is not None:
        if total < n_fit:
            raise ValueError(
                f"{n_gradients} gradients x {samples_per_gradient} samples need {n_fit} "
                f"samples but the data has {total}; lower n_gradients or pass more data"
            )
        want = min(want, total)
    samples = as_samples(data, want, seed=seed)
    if len(samples) < n_fit:
        raise ValueError(
            f"the data yielded {len(samples)} samples but {n_fit} are needed; lower "
            "n_gradients or pass more data"
        )
    fit = SampleSource(samples.x[:n_fit], samples.y[:n_fit])
    held = SampleSource(samples.x[n_fit:], samples.y[n_fit:])

    pruned = clone_model(model)
    _unmask(pruned)
    pruned.eval()
    times: dict[str, float] = {}
    t = time.perf_counter()
    example = example_input if example_input is not None else samples.x[:1]
    try:
        cm = CostModel.from_model(pruned, example)
    except RuntimeError as e:
        raise ValueError(
            f"the model could not run on the data ({e}); check the input shape "
            f"(got {tuple(samples.x.shape[1:])} per sample)"
        ) from e
    w_bar = flatten_weights(cm, dtype)
    groups = CostGroups.from_layers(cm.layer_costs(), cm.layer_sizes())
    p, dense = cm.num_weights, cm.dense_macs
    budget = Budget(
        None if nnz is None else int(math.floor(nnz * p + 1e-9)),
        None if flops is None else flops * dense,
    )
    times["costs"] = time.perf_counter() - t
    opts = options if options is not None else SolverOptions(progress=progress)

    if needs_grad:
        t = time.perf_counter()
        X = gradient_matrix(
            pruned, cm, fit, n_gradients, samples_per_gradient, loss_fn, dtype, device,
            memory_limit=memory_limit, progress=progress,
        )
        times["gradients"] = time.perf_counter() - t
        qm = QuadraticModel(X, w_bar.to(device), ridge, alpha, block_size)
    t = time.perf_counter()
    evaluate = _held_out_loss(pruned, cm, held, loss_fn, device) if len(held) else None
    if method == "mp":
        res = magnitude(w_bar, groups, budget)
    elif method == "mp_flops":
        res = magnitude_flops(w_bar, groups, budget)
    elif method == "woodfisher":
        res = woodfisher(qm, groups, budget)
    elif method == "chita":
        res = chita(qm, groups, budget, opts)
    else:
        res = falcon(qm, groups, budget, opts, evaluate)
    times["solver"] = time.perf_counter() - t
    w, mask = res.w.detach().to("cpu", torch.float32), res.mask.to("cpu")
    mask = mask & (w != 0)
    apply_weights(cm, w, mask)
    report = _verify(cm, budget, flops, nnz, method)
    times["total"] = time.perf_counter() - t_start
    details = _details(res, opts, method)
    if method == "falcon" and evaluate is None:
        details["selection"] = "quadratic model (no held-out samples left in the data)"
    elif method == "falcon":
        details["selection"] = f"held-out loss on {len(held)} samples"
    return PruneResult(
        model=pruned, method=method, flops_budget=flops, nnz_budget=nnz,
        flops_fraction=report[0] / dense, nnz_fraction=report[1] / p, dense_macs=dense,
        num_weights=p, layers=report[2], ilp_gap=res.ilp_gap,
        ilp_upper_bound=res.ilp_upper_bound, times=times, peak_rss_mb=peak_rss_mb(),
        details=details,
    )


def _held_out_loss(model: nn.Module, cm: CostModel, held: SampleSource, loss_fn, device):
    """Loss of ``model`` with flat prunable weights w on the held-out samples (eval mode)."""
    names = [lay.name + ".weight" for lay in cm.layers]
    loss_fn = loss_fn or F.cross_entropy

    def evaluate(w: torch.Tensor) -> float:
        params = {n: t.to(torch.float32) for n, t in zip(names, cm.split(w), strict=True)}
        total = 0.0
        with torch.no_grad():
            for a in range(0, len(held), 256):
                xb = held.x[a : a + 256].to(device)
                yb = held.y[a : a + 256].to(device)
                out = functional_call(model, params, (xb,))
                total += float(loss_fn(out, yb)) * len(xb)
        return total / len(held)

    return evaluate


def _verify(cm: CostModel, budget: Budget, flops, nnz, method):
    """Recount kept MACs and weights from the pruned layers' actual weights; raise if a
    budget is exceeded (a bug, never expected)."""
    layers, macs, kept_total = [], 0.0, 0
    for lay in cm.layers:
        kept = int(lay.module.weight.detach().count_nonzero())
        layers.append(LayerReport(lay.name, lay.kind, lay.numel, kept, lay.dense_macs,
                                  kept * lay.cost))
        macs += kept * lay.cost
        kept_total += kept
    if not budget.fits(kept_total, macs):
        raise RuntimeError(
            f"internal error: {method} returned {kept_total} weights / {macs:.0f} MACs over the "
            f"budgets (nnz {nnz}, flops {flops}); please report this"
        )
    return macs, kept_total, layers


def _details(res: SolverResult, opts: SolverOptions, method: str) -> dict:
    d: dict = {"iterations": res.iterations, "objective": res.objective}
    if method == "falcon":
        d["ridge"], d["cost_exponent"], d["source"] = res.ridge, res.beta, res.source
        d["candidates"] = [h for h in opts.history if "phase" in h]
    return d


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024
