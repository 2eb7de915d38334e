"""Pruning methods behind one interface (docs/method.md: the ILP, FALCON, baselines).

Every method maps the dense flat weights ``w_bar`` (p,) and the two budgets to pruned flat
weights (p,) whose support meets both budgets:

- ``mp``: global magnitude pruning: the longest prefix of weights by decreasing |w| that fits.
- ``mp_flops``: the ILP of section 3 with scores w^2 (FLOP-aware magnitude pruning).
- ``woodfisher``: OBS saliency w_i^2 / [H^-1]_ii on the quadratic model, then the exact
  (multi-weight OBS) update of the kept weights.
- ``chita``: IHT with a top-S projection plus back-solve on the quadratic model
  (sparsity-only).
- ``falcon``: IHT with the ILP projection plus back-solve; the projection's scores are
  v_i^2 f_i^beta, with beta (and the ridge) chosen by held-out loss when data allows.

Sparsity-only methods (mp, woodfisher, chita) given a FLOP budget search the largest
sparsity level whose support meets it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from falcon_prune.errors import ConfigError
from falcon_prune.ilp import CostGroups
from falcon_prune.quadratic import QuadraticModel
from falcon_prune.selection import (
    Budget,
    costs_of,
    per_weight_costs,
    select_ilp,
    select_prefix,
    select_top,
)

STEPS = ("lipschitz", "linesearch")
SALIENCIES = ("magnitude", "obs", "fisher")


@dataclass(frozen=True)
class SolverOptions:
    """Hyperparameters of the IHT solvers (chita, falcon); inputs only (what a run did is
    in its :class:`SolverTrace`).

    ``max_iter`` IHT iterations per round (0: falcon keeps its best warm start);
    ``rounds`` alternations of IHT and back-solve;
    ``step`` 'lipschitz' (1/L from power iteration) or 'linesearch' (backtracking from a
    larger step, accepting only descent); ``tol`` relative change that stops IHT once the
    support is stable; ``active_factor`` restricts IHT to the top (factor x kept) weights by
    |w_bar| (None: all weights). falcon's projection weights v_i^2 by f_i^beta: with
    held-out data beta is chosen from ``cost_exponents`` and the ridge from ``ridges`` by
    held-out loss; otherwise beta = ``cost_exponent``. ``saliencies`` are the weight
    importances the warm starts are built from: 'magnitude' (w^2), 'obs' (the optimal
    brain surgeon saliency w_i^2 / [H^-1]_ii of the quadratic model: the increase of Q when
    w_i alone is removed and the others compensate) and/or 'fisher' (w_i^2 times the
    diagonal of the Fisher: no compensation); each is tried with every exponent. For
    structure='channels' they score whole units (normalised group norm, group OBS, group
    Fisher).
    ``obs_steps`` > 1 adds one more candidate: the OBS warm start of the chosen exponent and
    ridge reached in that many steps, the saliencies recomputed on the shrinking support
    (:func:`obs_steps`); it replaces the one-step start when its held-out loss is lower.
    """

    max_iter: int = 30
    rounds: int = 1
    step: str = "lipschitz"
    step_scale: float = 1000.0
    tol: float = 1e-5
    active_factor: float | None = None
    ridges: tuple[float, ...] = (1e-2, 1e-3, 1e-4)
    cost_exponents: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    cost_exponent: float = 0.5
    saliencies: tuple[str, ...] = ("magnitude",)
    obs_steps: int = 1

    def __post_init__(self) -> None:
        for name in ("ridges", "cost_exponents", "saliencies"):
            v = getattr(self, name)
            if isinstance(v, (list, tuple)):
                object.__setattr__(self, name, tuple(v))
        _check_options(self)

    def replace(self, **changes: object) -> SolverOptions:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def _check_options(o: SolverOptions) -> None:
    def integer(name: str, low: int) -> None:
        v = getattr(o, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ConfigError(f"SolverOptions.{name} must be an integer >= {low}, got {v!r}")

    def number(name: str, ok) -> None:
        v = getattr(o, name)
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not ok(float(v)):
            raise ConfigError(f"SolverOptions.{name} has a bad value {v!r}: {_RULES[name]}")

    integer("max_iter", 0)
    integer("rounds", 1)
    integer("obs_steps", 1)
    if o.step not in STEPS:
        raise ConfigError(f"SolverOptions.step must be one of {STEPS}, got {o.step!r}")
    number("step_scale", lambda v: v >= 1)
    number("tol", lambda v: v >= 0)
    number("cost_exponent", lambda v: 0 <= v <= 1)
    if o.active_factor is not None:
        number("active_factor", lambda v: v >= 1)
    if not isinstance(o.ridges, tuple) or not o.ridges or not all(
            isinstance(r, numbers.Real) and r > 0 for r in o.ridges):
        raise ConfigError(f"SolverOptions.ridges must be positive numbers, got {o.ridges!r}")
    if not isinstance(o.cost_exponents, tuple) or not o.cost_exponents or not all(
            isinstance(b, numbers.Real) and 0 <= b <= 1 for b in o.cost_exponents):
        raise ConfigError(
            f"SolverOptions.cost_exponents must lie in [0, 1], got {o.cost_exponents!r}")
    if not isinstance(o.saliencies, tuple) or not o.saliencies or not set(
            o.saliencies) <= set(SALIENCIES):
        raise ConfigError(f"SolverOptions.saliencies must be a non-empty subset of "
                          f"{SALIENCIES}, got {o.saliencies!r}")


_RULES = {"step_scale": "it must be >= 1", "tol": "it must be >= 0",
          "cost_exponent": "it must lie in [0, 1]",
          "active_factor": "it must be >= 1 (the active set holds that many times the kept "
                           "weights) or None"}


@dataclass
class SolverTrace:
    """What a solver run did: its iterations and candidate scores (``history``), seconds
    per phase (``timings``: 'lipschitz', 'products', 'projection', 'saliency',
    'backsolve', 'held_out', 'obs_steps'), accumulated over every solve it is passed to;
    ``progress`` shows IHT progress bars."""

    progress: bool = False
    history: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


@contextmanager
def timed(trace: SolverTrace, phase: str) -> Iterator[None]:
    """Add the seconds spent in the block to ``trace.timings[phase]``."""
    t = time.perf_counter()
    try:
        yield
    finally:
        trace.timings[phase] = trace.timings.get(phase, 0.0) + time.perf_counter() - t


@dataclass
class SolverResult:
    w: torch.Tensor
    mask: torch.Tensor
    ilp_gap: float | None = None
    ilp_upper_bound: float | None = None
    iterations: int = 0
    objective: float | None = None
    ridge: float | None = None
    beta: float | None = None
    source: str | None = None
    saliency: str | None = None
    score: float | None = None  # held-out loss of w, when chosen by held-out data
    held_out: tuple[float, float | None] | None = None  # (loss, metric) when known


def magnitude(w_bar: torch.Tensor, groups: CostGroups, budget: Budget) -> SolverResult:
    """Global magnitude pruning: the longest prefix by decreasing |w| that fits."""
    order = torch.argsort(w_bar.abs(), descending=True, stable=True)
    mask = select_prefix(order, groups, budget)
    return SolverResult(w_bar * mask, mask)


def magnitude_flops(w_bar: torch.Tensor, groups: CostGroups, budget: Budget) -> SolverResult:
    """FLOP-aware magnitude pruning: the ILP with scores w^2."""
    r = select_ilp(w_bar.double() ** 2, groups, budget)
    return SolverResult(w_bar * r.mask, r.mask, r.gap, r.upper_bound)


def woodfisher(qm: QuadraticModel, groups: CostGroups, budget: Budget) -> SolverResult:
    """The longest prefix by decreasing OBS saliency that fits, then the exact update."""
    order = torch.argsort(obs_saliency(qm), descending=True, stable=True)
    mask = select_prefix(order, groups, budget)
    w, objective = qm.solve_with_value(mask)
    return SolverResult(w, mask, objective=objective)


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


def _step_budget(budget: Budget, count0: int, cost0: float, u: float, last: bool) -> Budget:
    """The budget a fraction ``u`` of the way from (count0, cost0) to ``budget``."""
    if last:
        return budget
    count = None if budget.count is None else max(
        budget.count, math.floor(count0 + (budget.count - count0) * u))
    cost = None if budget.cost is None else max(budget.cost, cost0 + (budget.cost - cost0) * u)
    return Budget(count, cost, budget.floors, budget.bounds)


def obs_steps(qm: QuadraticModel, groups: CostGroups, budget: Budget, beta: float,
              steps: int, saliency: torch.Tensor | None = None) -> SolverResult:
    """Reach ``budget`` from the support of ``qm.w_bar`` in ``steps`` removals, each to the
    next of equally spaced budgets: keep the ILP support of the OBS saliencies
    w_i^2 / [H_T^-1]_ii (weighted by f_i^beta) of the current support T, then minimise Q
    on what is kept. Since w minimises Q on T, the saliency is the exact increase of Q when
    w_i alone leaves T, so later steps account for the weights already removed (one OBS
    step is the warm start ``falcon`` builds from ``saliencies=('obs',)``). ``saliency``:
    :func:`obs_saliency` of ``qm`` when already computed (the first step's)."""
    mask = qm.w_bar != 0
    w = qm.w_bar
    count0, cost0 = int(mask.sum()), costs_of(mask, groups)
    for j in range(1, steps + 1):
        if j > 1 or saliency is None:
            saliency = (w.double() ** 2 / inverse_hessian_diagonal(qm, mask)) * mask
        step = _step_budget(budget, count0, cost0, j / steps, j == steps)
        r = select_ilp(weighted_scores(w, groups, beta, saliency), groups, step)
        mask = r.mask & mask  # the ILP's greedy fill may add zero-score weights
        w, objective = qm.solve_with_value(mask)
    return SolverResult(w, mask, r.gap, r.upper_bound, 0, objective, qm.lam)


Projection = Callable[[torch.Tensor], tuple[torch.Tensor, object]]


def iht(qm: QuadraticModel, w0: torch.Tensor, project: Projection, opts: SolverOptions,
        trace: SolverTrace, desc: str) -> tuple[torch.Tensor, torch.Tensor, object, int]:
    """Iterative hard thresholding on Q from the feasible ``w0``: v = w - eta grad Q(w),
    w = v restricted to project(v). Returns (w, mask, last projection info, iterations).

    With ``opts.step == 'linesearch'`` the step starts at ``step_scale`` / L, is halved
    until Q decreases, and when not even 1/L decreases Q the iteration stops at the current
    point: every accepted iterate has a lower Q than the one before."""
    with timed(trace, "lipschitz"):
        eta = 1.0 / qm.lipschitz()
    w, mask = w0, w0 != 0  # never written in place: no copy
    with timed(trace, "products"):
        q, g = qm.value_and_grad(w)
    info, it = None, 0
    search = opts.step == "linesearch"
    step = eta * opts.step_scale if search else eta
    bar = tqdm(total=opts.max_iter, desc=desc, unit="it", disable=not trace.progress,
               leave=False)
    for it in range(1, opts.max_iter + 1):
        step = min(step * 2, eta * opts.step_scale) if search else step
        while True:
            v = torch.add(w, g, alpha=-step)
            with timed(trace, "projection"):
                new_mask, new_info = project(v)
            w_new = v.mul_(new_mask)  # v is not needed after: one (p,) vector less
            with timed(trace, "products"):
                q_new, g_new = qm.value_and_grad(w_new)
            if not search or q_new <= q or step <= eta:
                break
            step = max(eta, step / 2)
        if search and q_new > q:
            it -= 1  # no step decreases Q: stop here, rejecting it
            break
        change = float((w_new - w).norm()) / max(float(w.norm()), 1e-30)
        stable = torch.equal(new_mask, mask)
        w, mask, q, g, info = w_new, new_mask, q_new, g_new, new_info
        trace.history.append({"method": desc, "iteration": it, "objective": q, "step": step})
        bar.update(1)
        bar.set_postfix(Q=f"{q:.4g}", change=f"{change:.1e}")
        if stable and change < opts.tol:
            break
    bar.close()
    return w, mask, info, it


def refine(qm: QuadraticModel, w0: torch.Tensor, project: Projection, opts: SolverOptions,
            trace: SolverTrace, desc: str) -> SolverResult:
    """Rounds of IHT followed by the back-solve on the support; keeps the best Q."""
    best: SolverResult | None = None
    w, total = w0, 0
    for r in range(max(1, opts.rounds)):
        w, mask, info, its = iht(qm, w, project, opts, trace, f"{desc} round {r + 1}")
        total += its
        with timed(trace, "backsolve"):
            w, obj = qm.solve_with_value(mask)
        if best is None or obj < best.objective:
            best = SolverResult(w, mask, getattr(info, "gap", None),
                                getattr(info, "upper_bound", None), total, obj)
    best.iterations = total
    return best


Evaluate = Callable[[torch.Tensor], float]


def weighted_scores(v: torch.Tensor, groups: CostGroups, beta: float,
                    saliency: torch.Tensor | None = None) -> torch.Tensor:
    """ILP scores s_i f_i^beta (p,) float64 with s = v^2 (or the given ``saliency`` (p,)):
    the projection in the norm weighted by f^beta. beta = 0 is plain FLOP-aware magnitude;
    as beta grows towards 1 the ILP's value-per-cost order s f^(beta-1) approaches global
    magnitude order. Grouped costs scale each group in place (no (p,) vector of f^beta)."""
    scores = (v.to(torch.float64, copy=True).square_() if saliency is None
              else saliency.to(torch.float64, copy=True))
    if beta == 0:
        return scores
    if hasattr(groups, "costs"):  # per-weight costs, not grouped
        f = per_weight_costs(groups, v.device).clamp_min(1e-12).pow_(beta)
        return scores.mul_(f)
    return groups.scale_(scores, groups.cost.clamp_min(1e-12).pow(beta).tolist())


@dataclass
class _Search:
    """One falcon solve's state: the model, budget, options, trace and held-out loss."""

    qm: QuadraticModel
    groups: CostGroups
    budget: Budget
    opts: SolverOptions
    trace: SolverTrace
    evaluate: Evaluate | None

    def score(self, w: torch.Tensor, objective: float) -> float:
        with timed(self.trace, "held_out"):
            return self.evaluate(w) if self.evaluate is not None else objective

    def candidate(self, key: tuple[str, float], lam: float, ilp) -> tuple[float, SolverResult]:
        """The back-solved warm start of the ILP support ``ilp`` with ridge ``lam``."""
        q = self.qm.with_ridge(lam)
        with timed(self.trace, "backsolve"):
            w, obj = q.solve_with_value(ilp.mask)
        s = self.score(w, obj)
        self.trace.history.append({"phase": "warm start", "saliency": key[0], "beta": key[1],
                                   "ridge": lam, "objective": obj, "score": s})
        res = SolverResult(w, ilp.mask, ilp.gap, ilp.upper_bound, 0, obj, lam, key[1],
                           saliency=key[0], score=s if self.evaluate is not None else None)
        return s, res


def _warm_starts(search: _Search) -> tuple[float, SolverResult, dict]:
    """The best warm start over saliencies x exponents, then over ridges."""
    opts, qm = search.opts, search.qm
    held = search.evaluate is not None
    betas = opts.cost_exponents if held else (opts.cost_exponent,)
    saliency = {"magnitude": None}
    if "obs" in opts.saliencies:
        with timed(search.trace, "saliency"):
            saliency["obs"] = obs_saliency(qm)
    if "fisher" in opts.saliencies:
        with timed(search.trace, "saliency"):
            saliency["fisher"] = fisher_saliency(qm)
    keys = [(k, b) for k in opts.saliencies for b in betas]
    with timed(search.trace, "projection"):
        starts = {(k, b): select_ilp(weighted_scores(qm.w_bar, search.groups, b, saliency[k]),
                                     search.groups, search.budget) for k, b in keys}
    best_s, best = min((search.candidate(key, qm.lam, starts[key]) for key in keys),
                       key=lambda c: c[0])
    key = (best.saliency, best.beta)
    for lam in opts.ridges if held else ():
        if lam != qm.lam:
            s, res = search.candidate(key, lam, starts[key])
            if s < best_s:
                best_s, best = s, res
    return best_s, best, saliency


def _stepped(search: _Search, best_s: float, best: SolverResult, saliency: dict
             ) -> tuple[float, SolverResult]:
    """The OBS warm start reached in ``obs_steps`` steps, when it scores better."""
    beta, lam = best.beta, best.ridge
    with timed(search.trace, "obs_steps"):
        stepped = obs_steps(search.qm.with_ridge(lam), search.groups, search.budget, beta,
                            search.opts.obs_steps,
                            saliency.get("obs") if lam == search.qm.lam else None)
    s = search.score(stepped.w, stepped.objective)
    search.trace.history.append({"phase": "obs steps", "saliency": "obs", "beta": beta,
                                 "ridge": lam, "objective": stepped.objective, "score": s})
    if s < best_s:
        stepped.beta, stepped.saliency, stepped.score = beta, f"obs x{search.opts.obs_steps}", s
        return s, stepped
    return best_s, best


def falcon(qm: QuadraticModel, groups: CostGroups, budget: Budget, opts: SolverOptions,
           trace: SolverTrace, evaluate: Evaluate | None = None) -> SolverResult:
    """FALCON: IHT on Q with the ILP projection, then back-solve.

    The projection keeps the support that maximises sum v_i^2 f_i^beta under both budgets.
    With ``evaluate`` (the network's loss on held-out samples, lower is better), beta is
    chosen from ``opts.cost_exponents`` and then the ridge from ``opts.ridges`` by the
    held-out loss of the back-solved warm start (the ILP support of w_bar); without it,
    beta = ``opts.cost_exponent`` and the model's ridge are used. IHT then runs from the
    chosen warm start; its result replaces the start only when it scores better."""
    search = _Search(qm, groups, budget, opts, trace, evaluate)
    best_s, best, saliency = _warm_starts(search)
    if opts.obs_steps > 1 and evaluate is not None:
        best_s, best = _stepped(search, best_s, best, saliency)
    del saliency  # (p,) vectors that IHT does not use
    if opts.max_iter == 0:  # warm start only (no IHT)
        best.source = "warm start"
        return best
    beta, lam = best.beta, best.ridge
    active = _active_set(qm.w_bar, groups, budget, opts)

    def project(v: torch.Tensor):
        scores = weighted_scores(v, groups, beta)
        r = select_ilp(scores if active is None else scores * active, groups, budget)
        # the ILP's greedy fill may add zero-score weights: keep the support inside the set
        return (r.mask if active is None else r.mask & (active > 0)), r

    refined = refine(qm.with_ridge(lam), qm.w_bar * best.mask, project, opts, trace, "falcon")
    s1 = search.score(refined.w, refined.objective)
    trace.history.append({"phase": "iht", "beta": beta, "ridge": lam, "score": s1,
                          "objective": refined.objective, "iterations": refined.iterations})
    chosen = refined if s1 < best_s else best
    chosen.iterations, chosen.ridge, chosen.beta = refined.iterations, lam, beta
    chosen.saliency = best.saliency  # IHT started from that warm start
    chosen.score = (s1 if chosen is refined else best_s) if evaluate is not None else None
    chosen.source = "iht" if chosen is refined else "warm start"
    return chosen


def _active_set(w_bar, groups, budget, opts) -> torch.Tensor | None:
    if opts.active_factor is None:
        return None
    base = magnitude_flops(w_bar, groups, budget)
    k = min(w_bar.numel(), int(math.ceil(opts.active_factor * int(base.mask.sum()))))
    keep = torch.zeros(w_bar.numel(), dtype=torch.float64, device=w_bar.device)
    keep[torch.topk(w_bar.abs(), k).indices] = 1
    return keep


def chita(qm: QuadraticModel, groups: CostGroups, budget: Budget, opts: SolverOptions,
          trace: SolverTrace) -> SolverResult:
    """CHITA: IHT with a top-S projection and back-solve (sparsity-only). With a FLOP budget,
    the largest S whose result meets it is found by bisection over S."""

    def run(S: int) -> SolverResult:
        def project(v: torch.Tensor):
            return select_top(v, S, budget), None

        start = magnitude(qm.w_bar, groups, Budget(S, None, budget.floors, budget.bounds))
        return refine(qm, qm.solve_on_support(start.mask), project, opts, trace,
                       f"chita S={S}")

    return search_sparsity(run, qm.w_bar, groups, budget)


def search_sparsity(
    run: Callable[[int], SolverResult], w_bar: torch.Tensor, groups: CostGroups, budget: Budget
) -> SolverResult:
    """The largest count S (within budget.count, at least the floors) whose ``run(S)``
    meets the cost budget, by bisection; the magnitude-pruning prefix gives the bracket."""
    p = w_bar.numel()
    cap = p if budget.count is None else min(p, budget.count)
    least = sum(budget.floors) if budget.has_floors else 0
    if budget.cost is None:
        return run(cap)
    fits = lambda r: costs_of(r.mask, groups) <= budget.cost * (1 + 1e-12)  # noqa: E731
    result = run(cap)
    if fits(result):
        return result
    lo = int(magnitude(w_bar, groups, budget).mask.sum())
    best = run(lo)
    while not fits(best) and lo > least:
        lo = max(least, lo // 2)
        best = run(lo)
    hi = cap
    while hi - lo > max(1, p // 2000):
        mid = (lo + hi) // 2
        r = run(mid)
        if fits(r):
            lo, best = mid, r
        else:
            hi = mid
    return best
