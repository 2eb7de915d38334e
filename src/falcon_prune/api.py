"""The one-call API: ``prune(model, data, flops=..., nnz=..., method=...)``.

Budgets are fractions of the dense model that are *kept*: ``flops=0.3`` keeps at most 30 % of
the multiply-accumulates of the prunable layers, ``nnz=0.5`` at most half of their weights.
The user's model is never modified: the pruned network is a copy whose prunable weights carry
``torch.nn.utils.prune`` masks (``make_permanent`` folds them into plain weights).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.utils import prune as torch_prune
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from falcon_prune import solvers
from falcon_prune.batchnorm import batchnorm_layers, recalibrate_batchnorm
from falcon_prune.costs import CostModel, find_prunable_modules, flatten_weights
from falcon_prune.fisher import LossFn, SampleSource, as_samples, gradient_store
from falcon_prune.ilp import CostGroups
from falcon_prune.quadratic import QuadraticModel
from falcon_prune.schedules import Schedule, as_schedule, stage_budgets
from falcon_prune.solvers import (
    Budget,
    SolverOptions,
    SolverResult,
    chita,
    falcon,
    magnitude,
    magnitude_flops,
    woodfisher,
)
from falcon_prune.storage import check_dtype, check_storage, compute_dtype_of

DEFAULT_RIDGE = 1e-3
#: samples the BatchNorm statistics are re-estimated on with ``recalibrate_bn=True``
BN_SAMPLES = 1000
#: falcon++ defaults for what the caller does not give: 12 cubic stages, of which those that
#: would prune less than 1 % of the dense model are merged into the next (min_step), each with
#: 1000 gradients of 2 samples (mini-batch gradients; 1 when the data is too small for 2)
#: taken from new samples at every stage, 500 held-out samples, first-order scale 0.01, warm
#: starts from the OBS saliency with FLOP exponents {0.25, 0.5, 0.75}, ridge candidates
#: {ridge, 1e-4} and no IHT refinement. Chosen on a validation split carved from the CIFAR-10
#: training images (benchmarks/tune_falcon_pp.py and
#: benchmarks/results/tune_falcon_pp_round*.json; README, Results).
MULTISTAGE_DEFAULTS: dict = {"stages": 12, "min_step": 0.01, "n_gradients": 1000,
                             "samples_per_gradient": 2, "n_validation": 500, "alpha": 0.01,
                             "ridges": (1e-4,), "cost_exponents": (0.25, 0.5, 0.75),
                             "max_iter": 0, "saliencies": ("obs",), "resample": True}
#: the SolverOptions fields whose falcon++ default differs from SolverOptions' own
MULTISTAGE_OPTIONS = ("max_iter", "ridges", "cost_exponents", "saliencies")
METHODS = (*solvers.METHODS, "falcon++")
NEEDS_GRADIENTS = {*solvers.NEEDS_GRADIENTS, "falcon++"}


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
    stages: list[dict] = field(default_factory=list)

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
            "stages": self.stages,
            "layers": [vars(r) for r in self.layers],
        }

    def write_trajectory(self, path: str | Path) -> Path:
        """Write the per-stage trajectory (falcon++) as CSV or JSON, by the file suffix."""
        return write_rows(self.stages, path)


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


def write_rows(rows: list[dict], path: str | Path) -> Path:
    """Write a list of flat dicts as ``.csv`` or ``.json`` (by suffix); returns the path."""
    path = Path(path)
    if path.suffix not in (".csv", ".json"):
        raise ValueError(f"{path}: write to a .csv or a .json file")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=1))
        return path
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _check_args(method: str, n_gradients: object, samples_per_gradient: object) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    for name, v in (("n_gradients", n_gradients), ("samples_per_gradient", samples_per_gradient)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


def _check_numerics(ridge, alpha, block_size, dtype, device, storage, memory_limit) -> None:
    """Validate the numerical options of ``prune`` before any work is done."""
    for name, v in (("ridge", ridge), ("alpha", alpha)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
            raise TypeError(f"{name} must be a number, got {v!r}")
    if not ridge > 0:
        raise ValueError(f"ridge must be > 0 (e.g. 1e-3), got {ridge!r}")
    if alpha < 0:
        raise ValueError(f"alpha (the first-order scale) must be >= 0, got {alpha!r}")
    if block_size is not None and (isinstance(block_size, bool) or
                                   not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"block_size must be a positive integer or None, got {block_size!r}")
    check_dtype(dtype)
    check_storage(storage)
    if memory_limit is not None and (isinstance(memory_limit, bool) or
                                     not isinstance(memory_limit, (int, float))
                                     or not memory_limit > 0):
        raise ValueError(f"memory_limit must be a positive number of bytes, got {memory_limit!r}")
    check_device(device)


def bn_sample_count(recalibrate_bn: object) -> int:
    """Samples for re-estimating BatchNorm statistics: 0 for False/0, :data:`BN_SAMPLES` for
    True, else the positive integer given."""
    if isinstance(recalibrate_bn, bool):
        return BN_SAMPLES if recalibrate_bn else 0
    if not isinstance(recalibrate_bn, int) or recalibrate_bn < 0:
        raise ValueError(
            "recalibrate_bn must be True/False or a number of samples >= 0, got "
            f"{recalibrate_bn!r}"
        )
    return recalibrate_bn


def check_device(device: object) -> torch.device:
    """The torch.device for ``device``, or a ValueError that says what is usable."""
    try:
        dev = torch.device(device)  # type: ignore[arg-type]
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a torch device (e.g. 'cpu', 'cuda')") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but torch sees no CUDA GPU here; use device='cpu'")
    return dev


def _data_length(data: object) -> int | None:
    """Number of samples in ``data`` (not batches), or None when it cannot be told."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        return len(data[0])
    if isinstance(data, DataLoader):
        try:
            return len(data.dataset)  # type: ignore[arg-type]
        except TypeError:
            return None
    if isinstance(data, Dataset):
        try:
            return len(data)  # type: ignore[arg-type]
        except TypeError:
            return None
    return None  # an iterable of batches: counted as it is read


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
@dataclass
class _Problem:
    """Everything one pruning solve needs besides the model's current weights."""

    n_gradients: int
    samples_per_gradient: int
    ridge: float
    alpha: float
    block_size: int | None
    options: SolverOptions
    loss_fn: LossFn | None
    dtype: torch.dtype
    device: torch.device | str
    memory_limit: int | None
    progress: bool
    storage: str = "auto"
    scratch_dir: str | None = None
    storage_used: str | None = None  # filled in by the first gradient solve


def prune(
    model: nn.Module,
    data: object,
    flops: float | None = None,
    nnz: float | None = None,
    method: str = "falcon",
    n_gradients: int | None = None,
    samples_per_gradient: int | None = None,
    n_validation: int | None = None,
    ridge: float = DEFAULT_RIDGE,
    alpha: float | None = None,
    block_size: int | None = None,
    options: SolverOptions | None = None,
    schedule: Schedule | str | Sequence[float] | None = None,
    stages: int | None = None,
    revive: bool = False,
    resample: bool | None = None,
    loss_fn: LossFn | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    memory_limit: int | None = None,
    storage: str = "auto",
    scratch_dir: str | None = None,
    example_input: torch.Tensor | None = None,
    recalibrate_bn: bool | int = False,
    seed: int = 0,
    progress: bool = True,
) -> PruneResult:
    """Prune a copy of ``model`` so that at most ``flops`` of its multiply-accumulates and at
    most ``nnz`` of its prunable weights are kept (fractions in (0, 1]; None: no limit; at
    least one budget is required).

    ``data``: an (inputs, targets) tuple of tensors, a Dataset of (x, y) pairs or a loader of
    (x, y) batches. The first ``n_gradients * samples_per_gradient`` samples give the
    gradient matrix (methods woodfisher, chita, falcon, falcon++; each row the gradient of
    the mean loss over ``samples_per_gradient`` samples, default 1); up to ``n_validation``
    further samples, when the data has them, let ``falcon`` choose its ridge and warm start
    by their loss (otherwise it uses Q with ``ridge``). ``ridge`` is lam and ``alpha`` the
    first-order scale of the quadratic model; ``block_size`` switches to the block-diagonal
    approximation.

    The gradient matrix is stored as ``storage`` says: 'memory', 'disk' (a scratch file in
    ``scratch_dir``, streamed in chunks) or 'auto' (default): in memory in ``dtype`` when
    it fits ``memory_limit`` bytes (default 60 % of the available RAM), else in float32 or
    float16, else on disk; the choice is in ``result.details['storage']`` (and printed
    when ``progress``). ``device='cuda'`` runs gradients and solvers on the GPU.

    The pruned copy lives on ``device``.

    ``method="falcon++"`` reaches the budgets in ``stages`` stages on ``schedule`` (a
    :class:`~falcon_prune.schedules.Schedule`, 'linear' / 'cubic' / 'exponential', or a list
    of kept fractions per stage; default: cubic); every stage recomputes the gradients at
    the current weights, takes them as the new centre and meets its own budgets; pruned
    weights stay pruned unless ``revive=True``. With ``resample`` (default) each stage
    computes its gradients on the next ``n_gradients`` samples of the data (cycling through
    what is there) instead of the same ones; the held-out samples stay the same. The
    per-stage trajectory is in ``result.stages``. Its stages choose the exponent and ridge
    like ``falcon``; what is not given comes from :data:`MULTISTAGE_DEFAULTS` (12 cubic
    stages less those that would prune under 1 % of the dense model, 1000 gradients of 2
    samples each, resampled, 500 held-out samples, alpha 0.01, warm starts from the OBS
    saliency with exponents {0.25, 0.5, 0.75}, ridges {``ridge``, 1e-4}, no IHT
    refinement), chosen on a validation split of the CIFAR-10 training images
    (``benchmarks/tune_falcon_pp.py``, README, Results); when the data holds fewer than
    ``2 * n_gradients`` samples, the default ``samples_per_gradient`` is 1. A named
    ``schedule`` ('cubic', ...) gets the default ``min_step``; a
    :class:`~falcon_prune.schedules.Schedule` given in full keeps its own. Single-stage
    defaults: 1000 gradients of 1 sample, 1000 held-out samples, alpha 0.
    Without ``revive``, weights that are already zero in ``model`` stay zero (any method).

    ``recalibrate_bn`` (any method): after pruning, re-estimate the BatchNorm running
    statistics of the pruned copy on the first :data:`BN_SAMPLES` (1000) samples drawn from
    ``data``, or on as many as the integer given; forward passes only, no weight changes
    (:func:`falcon_prune.batchnorm.recalibrate_batchnorm`). Pruning shifts every layer's
    output distribution, so this usually lifts accuracy a lot at small budgets (README,
    Results). Off by default: the paper's one-shot protocol keeps the trained statistics.

    Raises ``ValueError``/``TypeError`` on bad input and ``falcon_prune.MemoryBudgetError``
    when the gradient matrix cannot be stored within ``memory_limit`` bytes (with
    ``storage='memory'``, or when not even the disk path fits); the user's model is
    untouched in every case.
    """
    t_start = time.perf_counter()
    flops = check_fraction("flops", flops)
    nnz = check_fraction("nnz", nnz)
    if flops is None and nnz is None:
        raise ValueError("give at least one budget: flops=<fraction kept> and/or nnz=<fraction>")
    multistage = method == "falcon++"
    if n_gradients is None:
        n_gradients = MULTISTAGE_DEFAULTS["n_gradients"] if multistage else 1000
    if alpha is None:
        alpha = MULTISTAGE_DEFAULTS["alpha"] if multistage else 0.0
    spg_default = samples_per_gradient is None
    if spg_default:
        samples_per_gradient = MULTISTAGE_DEFAULTS["samples_per_gradient"] if multistage else 1
    _check_args(method, n_gradients, samples_per_gradient)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not find_prunable_modules(model):
        raise ValueError(
            f"{type(model).__name__} has no prunable layers (Conv1d/Conv2d/Conv3d/Linear); "
            "nothing to prune."
        )
    _check_numerics(ridge, alpha, block_size, dtype, device, storage, memory_limit)
    n_bn = bn_sample_count(recalibrate_bn)
    if not multistage and (schedule is not None or stages is not None or revive
                           or resample is not None):
        raise ValueError(
            f"schedule, stages, revive and resample belong to method='falcon++'; "
            f"method={method!r} is single-stage: drop them or use method='falcon++'"
        )
    if resample is None:
        resample = multistage and MULTISTAGE_DEFAULTS["resample"]
    plan = stage_budgets(as_schedule(schedule, stages, MULTISTAGE_DEFAULTS["stages"],
                                     MULTISTAGE_DEFAULTS["min_step"]), flops,
                         nnz) if multistage else [(flops, nnz)]
    if n_validation is None:
        n_validation = MULTISTAGE_DEFAULTS["n_validation"] if multistage else 1000
    if isinstance(n_validation, bool) or not isinstance(n_validation, int) or n_validation < 0:
        raise ValueError(f"n_validation must be an integer >= 0, got {n_validation!r}")
    if options is None:
        options = (multistage_options(progress=progress) if multistage
                   else SolverOptions(progress=progress))
    elif not isinstance(options, SolverOptions):
        raise TypeError(f"options must be a falcon_prune.SolverOptions, got {options!r}")
    else:
        options = dataclasses.replace(options, progress=options.progress and progress,
                                      history=[], timings={})
    torch.manual_seed(seed)
    needs_grad = method in NEEDS_GRADIENTS
    total = _data_length(data)
    n_fit = n_gradients * samples_per_gradient if needs_grad else 1
    # a default samples_per_gradient falls back to 1 when the data is too small for it
    per_row = 1 if spg_default else samples_per_gradient
    least = n_gradients * per_row if needs_grad else 1
    # falcon++ with resample: every stage takes the next n_fit samples of a pool (cycling)
    n_held = n_validation if method in ("falcon", "falcon++") else 0
    want = max(n_fit * (len(plan) if resample else 1) + n_held, n_bn)
    if total is not None:
        if total < least:
            raise ValueError(
                f"{n_gradients} gradients x {per_row} samples need {least} "
                f"samples but the data has {total}; lower n_gradients or pass more data"
            )
        want = min(want, total)
    samples = as_samples(data, want, seed=seed, minimum=least)
    if len(samples) < n_fit:  # only a default samples_per_gradient gets here
        samples_per_gradient, n_fit = 1, n_gradients
        if progress:
            tqdm.write(f"falcon++: {len(samples)} samples are fewer than {n_gradients} x "
                       f"{MULTISTAGE_DEFAULTS['samples_per_gradient']}; using 1 sample per "
                       "gradient", file=sys.stderr)
    n_held = min(n_held, len(samples) - n_fit)  # what the data has beyond one gradient block
    pool = len(samples) - n_held
    held = SampleSource(samples.x[pool:], samples.y[pool:])
    bn_x = samples.x[:n_bn]  # BatchNorm statistics: from the first samples drawn

    pruned = clone_model(model)
    _unmask(pruned)
    pruned.eval().to(device)
    times: dict[str, float] = {}
    t = time.perf_counter()
    example = example_input if example_input is not None else samples.x[:1]
    cm = cost_model_of(pruned, example.to(device), samples.x.shape[1:])
    groups = CostGroups.from_layers(cm.layer_costs(), cm.layer_sizes(),
                                    device=torch.device(device))
    p, dense = cm.num_weights, cm.dense_macs
    times["costs"] = time.perf_counter() - t
    problem = _Problem(
        n_gradients, samples_per_gradient, ridge, alpha, block_size,
        options,
        loss_fn, dtype, device, memory_limit, progress, storage, scratch_dir,
    )
    stage_method = "falcon" if method == "falcon++" else method
    trajectory: list[dict] = []
    # weights that come in pruned (zero) stay pruned, as do those of earlier stages
    mask = None if revive else flatten_weights(cm) != 0
    bar = tqdm(total=len(plan), desc="falcon++ stages", unit="stage",
               disable=not progress or method != "falcon++")
    for k, (f_k, s_k) in enumerate(plan, 1):
        t_stage = time.perf_counter()
        budget = budget_of(cm, f_k, s_k)
        allowed = None if (revive or mask is None) else mask
        rows = (torch.arange(n_fit) + (k - 1) * n_fit) % pool
        fit = SampleSource(samples.x[rows], samples.y[rows])
        res, w, mask = solve_step(pruned, cm, groups, budget, stage_method, fit, held, problem,
                                  allowed, times)
        write_weights(cm, w)
        if method == "falcon++":
            row = stage_record(k, pruned, cm, f_k, s_k, held, loss_fn, device, res.held_out)
            row["seconds"] = time.perf_counter() - t_stage
            row.update(_details(res, problem.options, stage_method, history=False))
            trajectory.append(row)
            bar.update(1)
            bar.set_postfix(flops=f"{row['flops_fraction']:.3f}",
                            loss=f"{row.get('held_out_loss', float('nan')):.3g}")
    bar.close()
    apply_weights(cm, flatten_weights(cm), mask)
    if n_bn:
        t = time.perf_counter()
        recalibrate_batchnorm(pruned, bn_x, device)
        times["batchnorm"] = time.perf_counter() - t
    budget = budget_of(cm, flops, nnz)
    report = _verify(cm, budget, flops, nnz, method)
    times["total"] = time.perf_counter() - t_start
    details = _details(res, problem.options, stage_method)
    if needs_grad:
        details["samples_per_gradient"] = samples_per_gradient
    if problem.storage_used is not None:
        details["storage"] = problem.storage_used
    details["batchnorm"] = _bn_note(pruned, len(bn_x) if n_bn else 0)
    if stage_method == "falcon":
        details["selection"] = (
            f"held-out loss on {len(held)} samples" if len(held)
            else "quadratic model (no held-out samples left in the data)"
        )
    return PruneResult(
        model=pruned, method=method, flops_budget=flops, nnz_budget=nnz,
        flops_fraction=report[0] / dense, nnz_fraction=report[1] / p, dense_macs=dense,
        num_weights=p, layers=report[2], ilp_gap=res.ilp_gap,
        ilp_upper_bound=res.ilp_upper_bound, times=times, peak_rss_mb=peak_rss_mb(),
        details=details, stages=trajectory,
    )


def multistage_options(**changes: object) -> SolverOptions:
    """falcon++'s default :class:`SolverOptions` (its fields in :data:`MULTISTAGE_DEFAULTS`)
    with ``changes`` applied, e.g. ``multistage_options(ridges=(1e-3,))`` to change one
    choice and keep the others; a plain ``SolverOptions(...)`` starts from the single-stage
    defaults instead (30 IHT iterations, magnitude warm starts, five exponents, three
    ridges). Raises ``TypeError`` for a field that SolverOptions does not have."""
    return SolverOptions(**{**{k: MULTISTAGE_DEFAULTS[k] for k in MULTISTAGE_OPTIONS},
                            **changes})


def cost_model_of(model: nn.Module, example: torch.Tensor, sample_shape) -> CostModel:
    """The cost model, with a shape error turned into a message about the data."""
    try:
        return CostModel.from_model(model, example)
    except RuntimeError as e:
        raise ValueError(
            f"the model could not run on the data ({e}); check the input shape "
            f"(got {tuple(sample_shape)} per sample)"
        ) from e


def budget_of(cm: CostModel, flops: float | None, nnz: float | None) -> Budget:
    """Absolute budgets (kept weights, kept MACs) from kept fractions."""
    return Budget(
        None if nnz is None else int(math.floor(nnz * cm.num_weights + 1e-9)),
        None if flops is None else flops * cm.dense_macs,
    )


def write_weights(cm: CostModel, w: torch.Tensor) -> None:
    """Copy flat weights ``w`` (p,) into the (plain, unmasked) prunable layers."""
    with torch.no_grad():
        for lay, wl in zip(cm.layers, cm.split(w), strict=True):
            lay.module.weight.copy_(wl.to(lay.module.weight.dtype))


def solve_step(
    model: nn.Module,
    cm: CostModel,
    groups: CostGroups,
    budget: Budget,
    method: str,
    fit: SampleSource,
    held: SampleSource,
    problem: _Problem,
    allowed: torch.Tensor | None = None,
    times: dict[str, float] | None = None,
) -> tuple[SolverResult, torch.Tensor, torch.Tensor]:
    """One pruning solve around the model's current (plain) weights.

    ``allowed`` (p,) bool restricts the support to those weights (the others stay zero): the
    problem is solved on the sub-vector, so X has only ``allowed.sum()`` columns. Returns
    the solver result and the flat weights (p,) float32 and mask (p,) bool on the CPU."""
    times = times if times is not None else {}
    w_all = flatten_weights(cm, compute_dtype_of(problem.dtype))
    if allowed is not None and bool(allowed.all()):
        allowed = None
    idx = None if allowed is None else allowed.nonzero().reshape(-1)
    w_bar = w_all if idx is None else w_all[idx]
    sub_groups = groups if allowed is None else groups.subset(allowed)
    held_loss = (
        _HeldOutLoss(model, cm, held, problem.loss_fn, problem.device) if len(held) else None
    )
    evaluate = None
    if held_loss is not None:
        evaluate = held_loss if idx is None else (lambda v: held_loss(_scatter(v, idx, cm)))
    if method in NEEDS_GRADIENTS:
        t = time.perf_counter()
        X = gradient_store(
            model, cm, fit, problem.n_gradients, problem.samples_per_gradient, problem.loss_fn,
            problem.dtype, problem.device, memory_limit=problem.memory_limit,
            progress=problem.progress, columns=idx, storage=problem.storage,
            scratch_dir=problem.scratch_dir,
        )
        if problem.storage_used is None:
            problem.storage_used = X.plan.describe()
            if problem.progress:
                tqdm.write(problem.storage_used, file=sys.stderr)
        times["gradients"] = times.get("gradients", 0.0) + time.perf_counter() - t
        qm = QuadraticModel(X, w_bar.to(problem.device), problem.ridge, problem.alpha,
                            problem.block_size)
    t = time.perf_counter()
    opts = problem.options
    if method == "mp":
        res = magnitude(w_bar, sub_groups, budget)
    elif method == "mp_flops":
        res = magnitude_flops(w_bar, sub_groups, budget)
    elif method == "woodfisher":
        res = woodfisher(qm, sub_groups, budget)
    elif method == "chita":
        res = chita(qm, sub_groups, budget, opts)
    else:
        res = falcon(qm, sub_groups, budget, opts, evaluate)
    times["solver"] = times.get("solver", 0.0) + time.perf_counter() - t
    for phase, seconds in opts.timings.items():  # cumulative over the run's stages
        times[f"solver:{phase}"] = seconds
    if held_loss is not None and res.score in held_loss.accuracy:
        res.held_out = (res.score, held_loss.accuracy[res.score])
    w = res.w.detach().to("cpu", torch.float32)
    mask = res.mask.to("cpu") & (w != 0)
    if idx is not None:
        w, mask = _scatter(w, idx, cm), _scatter(mask, idx, cm)
    return res, w * mask, mask


def _scatter(v: torch.Tensor, idx: torch.Tensor, cm: CostModel) -> torch.Tensor:
    out = torch.zeros(cm.num_weights, dtype=v.dtype, device=v.device)
    out[idx.to(v.device)] = v
    return out


def stage_record(
    k: int, model: nn.Module, cm: CostModel, flops, nnz, held: SampleSource, loss_fn, device,
    known: tuple[float, float] | None = None,
) -> dict:
    """Kept fractions of the model's current weights and, when there are held-out samples,
    their loss and accuracy (a row of the falcon++ / gradual trajectory); ``known`` is that
    (loss, accuracy) when the solver already measured it for these weights."""
    w = flatten_weights(cm)
    f = cm.layer_costs().to(torch.float64)
    kept = torch.stack([wl.count_nonzero() for wl in cm.split(w)]).to("cpu", torch.float64)
    row = {
        "stage": k, "flops_budget": flops, "nnz_budget": nnz,
        "flops_fraction": float((kept * f).sum()) / cm.dense_macs,
        "nnz_fraction": float(kept.sum()) / cm.num_weights,
    }
    if known is not None:
        row["held_out_loss"], row["held_out_accuracy"] = known
    elif len(held):
        row["held_out_loss"], row["held_out_accuracy"] = loss_and_accuracy(
            model, held, loss_fn, device)
    return row


def loss_and_accuracy(
    model: nn.Module, data: SampleSource, loss_fn=None, device="cpu", batch: int = 256
) -> tuple[float, float]:
    """Mean loss and top-1 accuracy of ``model`` (eval mode, no grad) on the samples."""
    loss_fn = loss_fn or F.cross_entropy
    was = model.training
    model.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for a in range(0, len(data), batch):
            xb, yb = data.x[a : a + batch].to(device), data.y[a : a + batch].to(device)
            out = model(xb)
            loss += float(loss_fn(out, yb)) * len(xb)
            if out.dim() == 2 and yb.dim() == 1:
                correct += int((out.argmax(1) == yb).sum())
    model.train(was)
    return loss / len(data), correct / len(data)


class _HeldOutLoss:
    """Loss of ``model`` with flat prunable weights w (p,) on the held-out samples (eval
    mode); remembers the accuracy that went with each loss it returned, so that the stage
    record of the chosen candidate needs no second pass over the samples."""

    def __init__(self, model: nn.Module, cm: CostModel, held: SampleSource, loss_fn, device):
        self.model, self.cm = model, cm
        self.names = [lay.name + ".weight" for lay in cm.layers]
        self.loss_fn = loss_fn or F.cross_entropy
        self.x, self.y = held.x.to(device), held.y.to(device)  # once, not at every call
        if self.x.dim() == 4:  # images: channels-last convolutions are faster (~1.6x on CPU)
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.accuracy: dict[float, float] = {}

    def __call__(self, w: torch.Tensor) -> float:
        params = {n: t.to(torch.float32)
                  for n, t in zip(self.names, self.cm.split(w), strict=True)}
        total, correct = 0.0, 0
        with torch.inference_mode():
            for a in range(0, len(self.x), 256):
                xb, yb = self.x[a : a + 256], self.y[a : a + 256]
                out = functional_call(self.model, params, (xb,))
                total += float(self.loss_fn(out, yb)) * len(xb)
                if out.dim() == 2 and yb.dim() == 1:
                    correct += int((out.argmax(1) == yb).sum())
        loss = total / len(self.x)
        self.accuracy[loss] = correct / len(self.x)
        return loss


def _bn_note(model: nn.Module, samples: int) -> str:
    """What happened to the BatchNorm statistics, for ``result.details['batchnorm']``."""
    if not batchnorm_layers(model):
        return "no BatchNorm layers"
    if not samples:
        return "running statistics kept as trained"
    return f"running statistics re-estimated on {samples} samples after pruning"


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


def _details(res: SolverResult, opts: SolverOptions, method: str, history: bool = True) -> dict:
    d: dict = {"iterations": res.iterations, "objective": res.objective}
    if method == "falcon":
        d["ridge"], d["cost_exponent"], d["source"] = res.ridge, res.beta, res.source
        d["saliency"] = res.saliency
        if history:
            d["candidates"] = [h for h in opts.history if "phase" in h]
    return d


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024
