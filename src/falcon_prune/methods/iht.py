"""Iterative hard thresholding on the quadratic model, and the back-solve after it.

IHT moves the weights along -grad Q and keeps what a *projection* chooses (the ILP of the
weights, the knapsack of the units, or a top-k), each round ending with Q minimised on the
chosen support (the back-solve). Every method that refines a support (chita, falcon) runs
these two functions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from falcon_prune.loss.quadratic import QuadraticModel
from falcon_prune.methods.options import SolverOptions, SolverResult, SolverTrace, timed

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
                                getattr(info, "upper_bound", None), total, obj,
                                keep=getattr(info, "keep", None))
    best.iterations = total
    return best
