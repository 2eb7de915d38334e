"""Pruning methods behind one interface (METHOD.md sections 3, 4 and 7).

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

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from falcon_prune.ilp import CostGroups, solve_ilp
from falcon_prune.quadratic import QuadraticModel

METHODS = ("mp", "mp_flops", "woodfisher", "chita", "falcon")
STEPS = ("lipschitz", "linesearch")
SALIENCIES = ("magnitude", "obs")
NEEDS_GRADIENTS = {"woodfisher", "chita", "falcon"}


@dataclass
class Budget:
    """Absolute budgets: ``count`` kept weights (None: no limit) and ``cost`` kept MACs per
    sample (None: no limit)."""

    count: int | None
    cost: float | None

    def fits(self, count: int, cost: float) -> bool:
        ok_count = self.count is None or count <= self.count
        ok_cost = self.cost is None or cost <= self.cost * (1 + 1e-12)
        return ok_count and ok_cost


@dataclass
class SolverOptions:
    """Hyperparameters of the IHT solvers (chita, falcon).

    ``max_iter`` IHT iterations per round (0: falcon keeps its best warm start);
    ``rounds`` alternations of IHT and back-solve;
    ``step`` 'lipschitz' (1/L from power iteration) or 'linesearch' (backtracking from a
    larger step, accepting only descent); ``tol`` relative change that stops IHT once the
    support is stable; ``active_factor`` restricts IHT to the top (factor x kept) weights by
    |w_bar| (None: all weights). falcon's projection weights v_i^2 by f_i^beta: with
    held-out data beta is chosen from ``cost_exponents`` and the ridge from ``ridges`` by
    held-out loss; otherwise beta = ``cost_exponent``. ``saliencies`` are the weight
    importances the warm starts are built from: 'magnitude' (w^2) and/or 'obs' (the optimal
    brain surgeon saliency w_i^2 / [H^-1]_ii of the quadratic model: the increase of Q when
    w_i alone is removed and the others compensate); each is tried with every exponent.
    ``obs_steps`` > 1 adds one more candidate: the OBS warm start of the chosen exponent and
    ridge reached in that many steps, the saliencies recomputed on the shrinking support
    (:func:`obs_steps`); it replaces the one-step start when its held-out loss is lower.

    A run appends its iterations to ``history`` and adds seconds per phase to ``timings``:
    'lipschitz' (power iteration), 'products' (Q and its gradient), 'projection' (ILP or
    top-S), 'saliency' (OBS saliencies), 'backsolve' (exact minimisation on a support),
    'held_out' (candidate losses).
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
    progress: bool = True
    history: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def integer(name: str, low: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"SolverOptions.{name} must be an integer >= {low}, got {v!r}")

        integer("max_iter", 0)
        integer("rounds", 1)
        integer("obs_steps", 1)
        if self.step not in STEPS:
            raise ValueError(f"SolverOptions.step must be one of {STEPS}, got {self.step!r}")
        if not self.step_scale >= 1:
            raise ValueError(f"SolverOptions.step_scale must be >= 1, got {self.step_scale!r}")
        if not self.tol >= 0:
            raise ValueError(f"SolverOptions.tol must be >= 0, got {self.tol!r}")
        if self.active_factor is not None and not self.active_factor >= 1:
            raise ValueError(
                "SolverOptions.active_factor must be >= 1 (the active set holds that many "
                f"times the kept weights) or None, got {self.active_factor!r}"
            )
        if not self.ridges or not all(r > 0 for r in self.ridges):
            raise ValueError(f"SolverOptions.ridges must be positive numbers, got {self.ridges!r}")
        if not self.cost_exponents or not all(0 <= b <= 1 for b in self.cost_exponents):
            raise ValueError(
                f"SolverOptions.cost_exponents must lie in [0, 1], got {self.cost_exponents!r}"
            )
        if not self.saliencies or not set(self.saliencies) <= set(SALIENCIES):
            raise ValueError(
                f"SolverOptions.saliencies must be a non-empty subset of {SALIENCIES}, got "
                f"{self.saliencies!r}"
            )
        if not 0 <= self.cost_exponent <= 1:
            raise ValueError(
                f"SolverOptions.cost_exponent must lie in [0, 1], got {self.cost_exponent!r}"
            )


@contextmanager
def timed(opts: SolverOptions, phase: str) -> Iterator[None]:
    """Add the seconds spent in the block to ``opts.timings[phase]``."""
    t = time.perf_counter()
    try:
        yield
    finally:
        opts.timings[phase] = opts.timings.get(phase, 0.0) + time.perf_counter() - t


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
    held_out: tuple[float, float] | None = None  # (loss, accuracy) when known


def costs_of(mask: torch.Tensor, groups: CostGroups) -> float:
    """Kept MACs of a flat mask under the grouped costs."""
    if hasattr(groups, "costs"):
        return float(groups.costs.to(mask.device)[mask].sum())
    return float(
        sum(
            c * int(mask[idx.to(mask.device)].sum())
            for c, idx in zip(groups.cost.tolist(), groups.index, strict=True)
        )
    )


def _per_weight_costs(groups: CostGroups, device) -> torch.Tensor:
    if hasattr(groups, "costs"):
        return groups.costs.to(device)
    f = torch.empty(groups.p, dtype=torch.float64, device=device)
    for c, idx in zip(groups.cost.tolist(), groups.index, strict=True):
        f[idx.to(device)] = c
    return f


def prefix_support(order: torch.Tensor, groups: CostGroups, budget: Budget) -> torch.Tensor:
    """Mask of the longest prefix of ``order`` (indices, most important first) meeting both
    budgets: the sparsity-level search of a sparsity-only method, done exactly."""
    f = _per_weight_costs(groups, order.device)[order]
    ok = torch.ones(order.numel(), dtype=torch.bool, device=order.device)
    if budget.cost is not None:
        ok &= torch.cumsum(f, 0) <= budget.cost * (1 + 1e-12)
    if budget.count is not None:
        ok &= torch.arange(1, order.numel() + 1, device=order.device) <= budget.count
    k = order.numel() if bool(ok.all()) else int(torch.argmin(ok.to(torch.int8)))
    mask = torch.zeros(order.numel(), dtype=torch.bool, device=order.device)
    mask[order[:k]] = True
    return mask


def magnitude(w_bar: torch.Tensor, groups: CostGroups, budget: Budget) -> SolverResult:
    order = torch.argsort(w_bar.abs(), descending=True, stable=True)
    mask = prefix_support(order, groups, budget)
    return SolverResult(w_bar * mask, mask)


def magnitude_flops(w_bar: torch.Tensor, groups: CostGroups, budget: Budget) -> SolverResult:
    r = solve_ilp(w_bar.double() ** 2, groups, budget.count, budget.cost)
    return SolverResult(w_bar * r.mask, r.mask, r.gap, r.upper_bound)


def woodfisher(qm: QuadraticModel, groups: CostGroups, budget: Budget) -> SolverResult:
    order = torch.argsort(obs_saliency(qm), descending=True, stable=True)
    mask = prefix_support(order, groups, budget)
    w = qm.solve_on_support(mask)
    return SolverResult(w, mask, objective=qm.value(w))


def obs_saliency(qm: QuadraticModel) -> torch.Tensor:
    """Optimal brain surgeon saliency w_i^2 / [H^-1]_ii (p,) float64 at ``qm.w_bar``: the
    increase of Q when w_i alone is removed and the other weights compensate."""
    return qm.w_bar.double() ** 2 / inverse_hessian_diagonal(qm)


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
        for a, b in X.ranges():
            Xc = X.columns(a, b)
            q = torch.linalg.solve_triangular(L, Xc, upper=False).square().sum(0).double()
            lower = 1 / (lam + Xc.square().sum(0).double() / n)
            out[a:b] = torch.maximum((1 - q) / lam, lower)
        return out
    for a, b in qm._blocks():
        B = min(qm.block_size, b - a)
        Xb = X.columns(a, b).reshape(n, -1, B).permute(1, 0, 2).double()
        mb = mask[a:b].to(qm.device).view(-1, B).double()
        H = Xb.transpose(1, 2) @ Xb / n * mb[:, :, None] * mb[:, None, :]
        H.diagonal(dim1=1, dim2=2).add_(lam)
        out[a:b] = (
            torch.cholesky_inverse(torch.linalg.cholesky(H)).diagonal(dim1=1, dim2=2).reshape(-1)
        )
    return out


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
        u = j / steps
        count = None if budget.count is None else (
            budget.count if j == steps else max(budget.count,
                                                math.floor(count0 + (budget.count - count0) * u)))
        cost = None if budget.cost is None else (
            budget.cost if j == steps else max(budget.cost, cost0 + (budget.cost - cost0) * u))
        if j > 1 or saliency is None:
            saliency = (w.double() ** 2 / inverse_hessian_diagonal(qm, mask)) * mask
        r = solve_ilp(weighted_scores(w, groups, beta, saliency), groups, count, cost)
        mask = r.mask & mask  # the ILP's greedy fill may add zero-score weights
        w = qm.solve_on_support(mask)
    return SolverResult(w, mask, r.gap, r.upper_bound, 0, qm.value(w), qm.lam)


Projection = Callable[[torch.Tensor], tuple[torch.Tensor, object]]


def iht(
    qm: QuadraticModel,
    w0: torch.Tensor,
    project: Projection,
    opts: SolverOptions,
    desc: str,
) -> tuple[torch.Tensor, torch.Tensor, object, int]:
    """Iterative hard thresholding on Q from the feasible ``w0``: v = w - eta grad Q(w),
    w = v restricted to project(v). Returns (w, mask, last projection info, iterations).

    With ``opts.step == 'linesearch'`` the step starts at ``step_scale`` / L, is halved
    until Q decreases, and when not even 1/L decreases Q the iteration stops at the current
    point: every accepted iterate has a lower Q than the one before."""
    with timed(opts, "lipschitz"):
        eta = 1.0 / qm.lipschitz()
    w = w0.clone()
    mask = w0 != 0
    with timed(opts, "products"):
        q, g = qm.value_and_grad(w)
    info = None
    it = 0
    step = eta * opts.step_scale if opts.step == "linesearch" else eta
    bar = tqdm(total=opts.max_iter, desc=desc, unit="it", disable=not opts.progress, leave=False)
    for it in range(1, opts.max_iter + 1):
        if opts.step == "linesearch":
            step = min(step * 2, eta * opts.step_scale)
        while True:
            v = w - step * g
            with timed(opts, "projection"):
                new_mask, new_info = project(v)
            w_new = v * new_mask
            with timed(opts, "products"):
                q_new, g_new = qm.value_and_grad(w_new)
            if opts.step != "linesearch" or q_new <= q or step <= eta:
                break
            step = max(eta, step / 2)
        if opts.step == "linesearch" and q_new > q:
            it -= 1  # no step decreases Q: stop here, rejecting it
            break
        change = float((w_new - w).norm()) / max(float(w.norm()), 1e-30)
        stable = torch.equal(new_mask, mask)
        w, mask, q, g, info = w_new, new_mask, q_new, g_new, new_info
        opts.history.append({"method": desc, "iteration": it, "objective": q, "step": step})
        bar.update(1)
        bar.set_postfix(Q=f"{q:.4g}", change=f"{change:.1e}")
        if stable and change < opts.tol:
            break
    bar.close()
    return w, mask, info, it


def _refine(
    qm: QuadraticModel, w0: torch.Tensor, project: Projection, opts: SolverOptions, desc: str
) -> SolverResult:
    """Rounds of IHT followed by the back-solve on the support; keeps the best Q."""
    best: SolverResult | None = None
    w = w0
    total = 0
    for r in range(max(1, opts.rounds)):
        w, mask, info, its = iht(qm, w, project, opts, f"{desc} round {r + 1}")
        total += its
        with timed(opts, "backsolve"):
            w = qm.solve_on_support(mask)
            obj = qm.value(w)
        if best is None or obj < best.objective:
            gap = getattr(info, "gap", None)
            ub = getattr(info, "upper_bound", None)
            best = SolverResult(w, mask, gap, ub, total, obj)
    best.iterations = total
    return best


Evaluate = Callable[[torch.Tensor], float]


def weighted_scores(
    v: torch.Tensor, groups: CostGroups, beta: float, saliency: torch.Tensor | None = None
) -> torch.Tensor:
    """ILP scores s_i f_i^beta (p,) float64 with s = v^2 (or the given ``saliency`` (p,)):
    the projection in the norm weighted by f^beta. beta = 0 is plain FLOP-aware magnitude;
    as beta grows towards 1 the ILP's value-per-cost order s f^(beta-1) approaches global
    magnitude order."""
    scores = v.double() ** 2 if saliency is None else saliency.double()
    if beta != 0:
        scores = scores * _per_weight_costs(groups, v.device).clamp_min(1e-12) ** beta
    return scores


def falcon(
    qm: QuadraticModel,
    groups: CostGroups,
    budget: Budget,
    opts: SolverOptions,
    evaluate: Evaluate | None = None,
) -> SolverResult:
    """FALCON: IHT on Q with the ILP projection, then back-solve.

    The projection keeps the support that maximises sum v_i^2 f_i^beta under both budgets.
    With ``evaluate`` (the network's loss on held-out samples, lower is better), beta is
    chosen from ``opts.cost_exponents`` and then the ridge from ``opts.ridges`` by the
    held-out loss of the back-solved warm start (the ILP support of w_bar); without it,
    beta = ``opts.cost_exponent`` and the model's ridge are used. IHT then runs from the
    chosen warm start; its result replaces the start only when it scores better."""
    w_bar = qm.w_bar
    betas = tuple(opts.cost_exponents) if evaluate is not None else (opts.cost_exponent,)
    ridges = tuple(opts.ridges) if evaluate is not None else ()

    def candidate(key: tuple[str, float], lam: float, ilp) -> tuple[float, SolverResult]:
        q = qm.with_ridge(lam)
        with timed(opts, "backsolve"):
            w = q.solve_on_support(ilp.mask)
            obj = q.value(w)
        with timed(opts, "held_out"):
            s = evaluate(w) if evaluate is not None else obj
        opts.history.append({"phase": "warm start", "saliency": key[0], "beta": key[1],
                             "ridge": lam, "objective": obj, "score": s})
        res = SolverResult(w, ilp.mask, ilp.gap, ilp.upper_bound, 0, obj, lam)
        res.beta, res.saliency = key[1], key[0]
        res.score = s if evaluate is not None else None
        return s, res

    saliency = {"magnitude": None}
    if "obs" in opts.saliencies:
        with timed(opts, "saliency"):
            saliency["obs"] = obs_saliency(qm)
    keys = [(k, b) for k in opts.saliencies for b in betas]
    with timed(opts, "projection"):
        starts = {
            (k, b): solve_ilp(weighted_scores(w_bar, groups, b, saliency[k]), groups,
                              budget.count, budget.cost)
            for k, b in keys
        }
    best_s, best = min((candidate(key, qm.lam, starts[key]) for key in keys),
                       key=lambda c: c[0])
    best_key = (best.saliency, best.beta)
    for lam in ridges:
        if lam != qm.lam:
            s, res = candidate(best_key, lam, starts[best_key])
            if s < best_s:
                best_s, best = s, res
    beta, lam = best.beta, best.ridge
    if opts.obs_steps > 1 and evaluate is not None:
        with timed(opts, "obs_steps"):
            stepped = obs_steps(qm.with_ridge(lam), groups, budget, beta, opts.obs_steps,
                                saliency.get("obs") if lam == qm.lam else None)
        with timed(opts, "held_out"):
            s = evaluate(stepped.w)
        opts.history.append({"phase": "obs steps", "saliency": "obs", "beta": beta,
                             "ridge": lam, "objective": stepped.objective, "score": s})
        if s < best_s:
            stepped.beta, stepped.saliency, stepped.score = beta, f"obs x{opts.obs_steps}", s
            best_s, best = s, stepped
    if opts.max_iter == 0:  # warm start only (no IHT)
        best.source = "warm start"
        return best
    q = qm.with_ridge(lam)
    active = _active_set(w_bar, groups, budget, opts)

    def project(v: torch.Tensor):
        scores = weighted_scores(v, groups, beta)
        if active is None:
            r = solve_ilp(scores, groups, budget.count, budget.cost)
            return r.mask, r
        r = solve_ilp(scores * active, groups, budget.count, budget.cost)
        # the ILP's greedy fill may add zero-score weights: keep the support inside the set
        return r.mask & (active > 0), r

    refined = _refine(q, w_bar * best.mask, project, opts, "falcon")
    with timed(opts, "held_out"):
        s1 = evaluate(refined.w) if evaluate is not None else refined.objective
    opts.history.append(
        {"phase": "iht", "beta": beta, "ridge": lam, "objective": refined.objective,
         "score": s1, "iterations": refined.iterations}
    )
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


def chita(
    qm: QuadraticModel, groups: CostGroups, budget: Budget, opts: SolverOptions
) -> SolverResult:
    """CHITA: IHT with a top-S projection and back-solve (sparsity-only). With a FLOP budget,
    the largest S whose result meets it is found by bisection over S."""

    def run(S: int) -> SolverResult:
        def project(v: torch.Tensor):
            mask = torch.zeros(v.numel(), dtype=torch.bool, device=v.device)
            if S > 0:
                mask[torch.topk(v.abs(), S).indices] = True
            return mask, None

        start = magnitude(qm.w_bar, groups, Budget(S, None))
        return _refine(qm, qm.solve_on_support(start.mask), project, opts, f"chita S={S}")

    return search_sparsity(run, qm.w_bar, groups, budget)


def search_sparsity(
    run: Callable[[int], SolverResult], w_bar: torch.Tensor, groups: CostGroups, budget: Budget
) -> SolverResult:
    """The largest count S (within budget.count) whose ``run(S)`` meets the cost budget, by
    bisection; the magnitude-pruning prefix gives the starting bracket."""
    p = w_bar.numel()
    cap = p if budget.count is None else min(p, budget.count)
    if budget.cost is None:
        return run(cap)
    result = run(cap)
    if costs_of(result.mask, groups) <= budget.cost * (1 + 1e-12):
        return result
    lo = int(magnitude(w_bar, groups, budget).mask.sum())
    best = run(lo)
    while costs_of(best.mask, groups) > budget.cost * (1 + 1e-12) and lo > 0:
        lo //= 2
        best = run(lo)
    hi = cap
    while hi - lo > max(1, p // 2000):
        mid = (lo + hi) // 2
        r = run(mid)
        if costs_of(r.mask, groups) <= budget.cost * (1 + 1e-12):
            lo, best = mid, r
        else:
            hi = mid
    return best
