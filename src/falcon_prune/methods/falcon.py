"""FALCON: warm starts chosen on held-out samples, then IHT with the budgets' selection.

One implementation for every space (docs/method.md, FALCON). For each saliency of
``options.saliencies`` (per item: magnitude, OBS, Fisher) and each cost exponent beta, the
items of largest saliency x MACs^beta are selected under both budgets (the ILP of single
weights, the knapsack of units); each selection is a warm start, back-solved on Q (and, for
units, also taken with its surviving weights as they are) and scored by its held-out loss.
The best one's ridge is then chosen from ``options.ridges``. Optionally the OBS warm start
is reached in ``obs_steps`` steps. Iterative hard thresholding whose projection is the same
selection on v² x MACs^beta then runs from the best warm start, and replaces it only when
it scores better. Without held-out samples beta = ``options.cost_exponent`` and Q decides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from falcon_prune.loss.quadratic import QuadraticModel
from falcon_prune.methods.iht import refine
from falcon_prune.methods.obs import obs_steps
from falcon_prune.methods.options import SolverResult, timed
from falcon_prune.methods.registry import Problem
from falcon_prune.spaces.base import Selection


@dataclass
class _Search:
    """One falcon solve: the problem, and the best candidate found so far."""

    problem: Problem
    best: SolverResult | None = None
    best_score: float = math.inf

    def score(self, w: torch.Tensor, objective: float, selection: Selection) -> float:
        """The held-out loss of ``w``, or Q without held-out samples."""
        p = self.problem
        with timed(p.trace, "held_out"):
            return p.evaluate(w, selection) if p.evaluate is not None else objective

    def offer(self, result: SolverResult, score: float) -> None:
        """Keep ``result`` when it scores strictly better (the first of equals stays)."""
        if self.best is None or score < self.best_score:
            self.best, self.best_score = result, score

    def candidate(self, key: tuple[str, float], lam: float | None, selection: Selection
                  ) -> None:
        """The warm start ``selection`` with its surviving weights as they are (``lam``
        None) or back-solved on Q with ridge ``lam``, scored and offered."""
        p = self.problem
        support = selection.support.to(p.qm.device)
        with timed(p.trace, "backsolve"):
            if lam is None:
                w = p.qm.w_bar * support
                objective = p.qm.value(w)
            else:
                w, objective = p.qm.with_ridge(lam).solve_with_value(support)
        s = self.score(w, objective, selection)
        p.trace.history.append({"phase": "warm start", "saliency": key[0], "beta": key[1],
                                "ridge": lam, "objective": objective, "score": s,
                                **p.choices.describe(selection)})
        self.offer(p.choices.result(selection, w, objective=objective, ridge=lam,
                                    beta=key[1], saliency=key[0],
                                    score=s if p.evaluate is not None else None), s)


def _warm_starts(search: _Search) -> tuple[dict[str, torch.Tensor], dict]:
    """Every saliency x exponent warm start, then the best one's ridges; returns the
    saliencies and the selections by (saliency, exponent)."""
    p = search.problem
    c, qm, opts = p.choices, p.qm, p.options
    held = p.evaluate is not None
    betas = opts.cost_exponents if held else (opts.cost_exponent,)
    with timed(p.trace, "saliency"):
        saliency = c.saliencies(qm, opts.saliencies, p.config.obs_rank)
    keys = [(k, b) for k in opts.saliencies for b in betas]
    with timed(p.trace, "projection"):
        starts = {key: c.select(c.weighted(saliency[key[0]], key[1])) for key in keys}
    for key in keys:
        for lam in c.start_ridges(qm.lam):
            search.candidate(key, lam, starts[key])
    best = search.best
    key = (best.saliency, best.beta)
    for lam in opts.ridges if held and best.ridge is not None else ():
        if lam != qm.lam:
            search.candidate(key, lam, starts[key])
    return saliency, starts


def _stepped(search: _Search, saliency: dict[str, torch.Tensor]) -> None:
    """The OBS warm start of the best exponent and ridge reached in ``obs_steps`` steps,
    offered as one more candidate."""
    p, best = search.problem, search.best
    lam = best.ridge if best.ridge is not None else p.qm.lam
    with timed(p.trace, "obs_steps"):
        stepped = obs_steps(p.qm.with_ridge(lam), p.choices, best.beta, p.options.obs_steps,
                            saliency.get("obs") if lam == p.qm.lam else None)
    s = search.score(stepped.w, stepped.objective, Selection(stepped.mask))
    p.trace.history.append({"phase": "obs steps", "saliency": "obs", "beta": best.beta,
                            "ridge": lam, "objective": stepped.objective, "score": s})
    stepped.beta, stepped.saliency = best.beta, f"obs x{p.options.obs_steps}"
    stepped.score = s
    search.offer(stepped, s)


def _iht(search: _Search) -> SolverResult:
    """IHT from the best warm start with the selection as projection; the result replaces
    the warm start only when it scores better."""
    p, best, best_s = search.problem, search.best, search.best_score
    c, opts = p.choices, p.options
    beta = best.beta
    lam = best.ridge if best.ridge is not None else p.qm.lam
    active = c.active(opts.active_factor)

    def project(v: torch.Tensor) -> tuple[torch.Tensor, Selection]:
        scores = c.weighted(c.scores_of(v), beta)
        s = c.select(scores if active is None else scores * active)
        # the ILP's greedy fill may add zero-score weights: keep the support inside the set
        support = s.support if active is None else s.support & (active > 0)
        return support, s

    q: QuadraticModel = p.qm.with_ridge(lam)
    refined = refine(q, q.w_bar * best.mask, project, opts, p.trace, "falcon")
    s1 = search.score(refined.w, refined.objective, Selection(refined.mask, refined.keep))
    p.trace.history.append({"phase": "iht", "beta": beta, "ridge": lam, "score": s1,
                            "objective": refined.objective, "iterations": refined.iterations})
    chosen = refined if s1 < best_s else best
    chosen.iterations, chosen.beta = refined.iterations, beta
    if chosen is refined:
        chosen.ridge = lam
    chosen.saliency = best.saliency  # IHT started from that warm start
    chosen.score = (s1 if chosen is refined else best_s) if p.evaluate is not None else None
    chosen.source = "iht" if chosen is refined else "warm start"
    return chosen


def falcon(problem: Problem) -> SolverResult:
    """FALCON on the problem's choices (see the module's docstring)."""
    search = _Search(problem)
    saliency, _ = _warm_starts(search)
    opts = problem.options
    if opts.obs_steps > 1 and problem.evaluate is not None:
        _stepped(search, saliency)
    del saliency  # vectors that IHT does not use
    if opts.max_iter == 0:  # warm start only (no IHT)
        search.best.source = "warm start"
        return search.best
    return _iht(search)
