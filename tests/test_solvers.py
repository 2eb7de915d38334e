"""The solvers on the quadratic model of a small trained CNN: budgets, floors, choices."""

import dataclasses

import pytest
import torch

import falcon_prune as fp
from falcon_prune.analysis.costs import CostModel, flatten_weights
from falcon_prune.data.batches import Samples
from falcon_prune.errors import ConfigError
from falcon_prune.loss.gradients import gradient_matrix
from falcon_prune.loss.quadratic import QuadraticModel
from falcon_prune.loss.saliency import inverse_hessian_diagonal, obs_saliency
from falcon_prune.methods import Problem, get_method
from falcon_prune.methods.iht import iht
from falcon_prune.methods.obs import obs_steps
from falcon_prune.methods.options import SolverOptions, SolverTrace
from falcon_prune.selection.groups import CostGroups
from falcon_prune.selection.ilp import solve_ilp
from falcon_prune.selection.weights import Budget, select_prefix
from falcon_prune.spaces.weights import WeightChoices


@pytest.fixture(scope="module")
def problem(cnn, data):
    x, y = data
    cm = CostModel.from_model(cnn, x[:1])
    X = gradient_matrix(cnn, cm, Samples((x, y)), 100, progress=False)
    w = flatten_weights(cm)
    groups = CostGroups.from_layers(cm.layer_costs(), cm.layer_sizes())
    return cm, QuadraticModel(X, w, 1e-3), groups


def budget_of(cm, nnz, flops, floors=None):
    return Budget(None if nnz is None else int(nnz * cm.num_weights),
                  None if flops is None else flops * cm.dense_macs,
                  floors, None if floors is None else tuple(cm.offsets))


METHODS = ("mp", "mp_flops", "woodfisher", "chita", "falcon")
BUDGETS = [(None, 0.4), (0.5, None), (0.3, 0.5), (0.6, 0.3)]


def solve(method, qm, groups, budget, opts=None, trace=None, evaluate=None):
    """The registered method's solver on the weights of ``qm`` (``evaluate(w)``: the
    held-out score, or None)."""
    problem = Problem(WeightChoices(qm.w_bar, groups, budget), qm,
                      opts if opts is not None else SolverOptions(max_iter=10),
                      trace if trace is not None else SolverTrace(),
                      None if evaluate is None else (lambda w, selection: evaluate(w)),
                      fp.defaults(method))
    return get_method(method).solve(problem)


def run(method, qm, groups, budget, trace=None, evaluate=None):
    return solve(method, qm, groups, budget, trace=trace, evaluate=evaluate)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("fractions", BUDGETS)
def test_every_method_meets_both_budgets(problem, method, fractions):
    cm, qm, groups = problem
    nnz, flops = fractions
    budget = budget_of(cm, nnz, flops)
    r = run(method, qm, groups, budget)
    kept = r.mask & (r.w != 0)
    assert budget.fits(int(kept.sum()), cm.macs_of_mask(kept))
    assert torch.all(r.w[~r.mask] == 0)
    # not trivially empty: the search uses most of the tighter budget
    used = cm.macs_of_mask(r.mask) / cm.dense_macs
    assert used > 0.5 * (flops or 0) and int(r.mask.sum()) > 0


@pytest.mark.parametrize("method", METHODS)
def test_every_method_keeps_the_per_layer_floors(problem, method):
    cm, qm, groups = problem
    # a budget so tight that without floors the cheapest layer would take all of it
    floors = (5, 1, 3)
    budget = budget_of(cm, 0.05, 0.05, floors)
    r = run(method, qm, groups, budget)
    per_layer = [int(m.sum()) for m in cm.split(r.mask)]
    assert all(k >= f for k, f in zip(per_layer, floors, strict=True)), per_layer
    assert budget.fits(int(r.mask.sum()), cm.macs_of_mask(r.mask))


def test_falcon_improves_the_model_over_magnitude_start(problem):
    cm, qm, groups = problem
    budget = budget_of(cm, None, 0.35)
    start = solve("mp_flops", qm, groups, budget)
    trace = SolverTrace()
    r = solve("falcon", qm, groups, budget, SolverOptions(cost_exponent=0.0), trace)
    assert r.objective < qm.value(start.w)
    assert r.ilp_gap is not None and r.ilp_gap >= 0
    assert r.source in ("iht", "warm start") and r.iterations >= 1
    iterations = [h for h in trace.history if "iteration" in h]
    assert len(iterations) == r.iterations
    assert {"lipschitz", "products", "projection", "backsolve"} <= set(trace.timings)


def test_falcon_selection_uses_evaluate(problem):
    cm, qm, groups = problem
    budget = budget_of(cm, None, 0.35)
    calls = []

    def evaluate(w):
        calls.append(w)
        return float(w.abs().sum())  # prefers small weights: a checkable choice

    opts = SolverOptions(max_iter=5)
    trace = SolverTrace()
    r = solve("falcon", qm, groups, budget, opts, trace, evaluate=evaluate)
    starts = [h for h in trace.history if h.get("phase") == "warm start"]
    assert len(starts) == len(opts.cost_exponents) + len(opts.ridges) - 1
    assert len(calls) == len(starts) + 1  # every warm start and the IHT result
    scored = starts + [h for h in trace.history if h.get("phase") == "iht"]
    best = min(h["score"] for h in scored)
    assert float(r.w.abs().sum()) == pytest.approx(best)
    assert r.score == pytest.approx(best)


def test_trace_accumulates_over_solves(problem):
    cm, qm, groups = problem
    budget = budget_of(cm, None, 0.35)
    trace = SolverTrace()
    opts = SolverOptions(max_iter=3)
    solve("falcon", qm, groups, budget, opts, trace)
    first = (len(trace.history), trace.timings["projection"])
    solve("falcon", qm, groups, budget, opts, trace)
    assert len(trace.history) > first[0] and trace.timings["projection"] > first[1]


def test_linesearch_iht_never_increases_q(problem):
    cm, qm, groups = problem
    budget = budget_of(cm, None, 0.3)
    opts = SolverOptions(step="linesearch", max_iter=15)
    trace = SolverTrace()
    start = solve("mp_flops", qm, groups, budget)

    def project(v):
        r = solve_ilp(v.double() ** 2, groups, None, budget.cost)
        return r.mask, r

    w, mask, _, its = iht(qm, start.w, project, opts, trace, "t")
    q = [qm.value(start.w)] + [h["objective"] for h in trace.history]
    assert len(q) == its + 1 >= 2
    assert all(b <= a + 1e-9 for a, b in zip(q, q[1:], strict=False))
    assert torch.all(w[~mask] == 0) and qm.value(w) == pytest.approx(q[-1])


def test_inverse_hessian_diagonal(problem):
    _, qm, _ = problem
    X = qm.X.columns(0, 200).double()
    small = QuadraticModel(X, qm.w_bar[:200].double(), 1e-2, chunk=64)
    H = X.T @ X / small.n + 1e-2 * torch.eye(200, dtype=torch.float64)
    ref = torch.linalg.inv(H).diagonal()
    assert torch.allclose(inverse_hessian_diagonal(small), ref, rtol=1e-6)
    blocked = QuadraticModel(X, small.w_bar, 1e-2, block_size=50)
    Hb = torch.block_diag(*[H[a : a + 50, a : a + 50] for a in range(0, 200, 50)])
    assert torch.allclose(inverse_hessian_diagonal(blocked), torch.linalg.inv(Hb).diagonal(),
                          rtol=1e-6)


def test_inverse_hessian_diagonal_on_a_support(problem):
    _, qm, _ = problem
    X = qm.X.columns(0, 200).double()
    T = torch.rand(200, generator=torch.Generator().manual_seed(0)) < 0.4
    H = X.T @ X / X.shape[0]
    ref = torch.linalg.inv(H[T][:, T] + 1e-2 * torch.eye(int(T.sum()), dtype=torch.float64))
    small = QuadraticModel(X, qm.w_bar[:200].double(), 1e-2, chunk=64)
    assert torch.allclose(inverse_hessian_diagonal(small, T)[T], ref.diagonal(), rtol=1e-6)
    blocked = QuadraticModel(X, small.w_bar, 1e-2, block_size=50)
    Hb = torch.block_diag(*[H[a : a + 50, a : a + 50] for a in range(0, 200, 50)])
    ref_b = torch.linalg.inv(Hb[T][:, T] + 1e-2 * torch.eye(int(T.sum()), dtype=torch.float64))
    assert torch.allclose(inverse_hessian_diagonal(blocked, T)[T], ref_b.diagonal(),
                          rtol=1e-6)


@pytest.mark.parametrize("fractions", [(None, 0.3), (0.4, None), (0.3, 0.4)])
def test_obs_steps_meet_the_budgets_and_one_step_is_the_obs_warm_start(problem, fractions):
    cm, qm, groups = problem
    nnz, flops = fractions
    budget = budget_of(cm, nnz, flops)
    choices = WeightChoices(qm.w_bar, groups, budget)
    one = obs_steps(qm, choices, 0.5, 1)
    ilp = solve_ilp(choices.weighted(obs_saliency(qm), 0.5), groups, budget.count, budget.cost)
    assert torch.equal(one.mask, ilp.mask)
    for steps in (1, 3):
        r = obs_steps(qm, choices, 0.5, steps)
        assert budget.fits(int(r.mask.sum()), cm.macs_of_mask(r.mask))
        # w minimises Q on its support: the gradient vanishes there
        g = qm.grad(r.w)
        assert float(g[r.mask].abs().max()) < 1e-4 * float(qm.grad(qm.w_bar * r.mask).abs().max())
        assert bool((r.w[~r.mask] == 0).all())


def test_falcon_obs_steps_candidate_is_scored_and_kept_when_better(problem):
    cm, qm, groups = problem
    budget = budget_of(cm, None, 0.3)
    opts = SolverOptions(saliencies=("obs",), max_iter=0, obs_steps=3)
    trace = SolverTrace()
    res = solve("falcon", qm, groups, budget, opts, trace, evaluate=qm.value)
    stepped = [h for h in trace.history if h["phase"] == "obs steps"]
    assert len(stepped) == 1
    best = min(h["score"] for h in trace.history)
    assert qm.value(res.w) == pytest.approx(best)
    assert cm.macs_of_mask(res.mask) <= budget.cost
    assert res.saliency == ("obs x3" if stepped[0]["score"] == best else "obs")
    assert "obs_steps" in trace.timings


def test_inverse_hessian_diagonal_float32_stays_exact_enough(problem):
    """float32 X (the default storage), with curvature up to ~1e5 times the ridge where
    1 - ||L^-1 x||^2 cancels: close to the float64 answer and never below 1 / H_ii."""
    _, qm, _ = problem
    X = qm.X.columns(0, 300).double()
    lam = 1e-6
    H = X.T @ X / X.shape[0] + lam * torch.eye(300, dtype=torch.float64)
    assert float(H.diagonal().max()) > 1e4 * lam
    ref = torch.linalg.inv(H).diagonal()
    got = inverse_hessian_diagonal(QuadraticModel(X.float(), qm.w_bar[:300], lam))
    assert got.dtype == torch.float64
    assert bool((got >= 1 / H.diagonal() * (1 - 1e-9)).all())
    assert torch.allclose(got, ref, rtol=1e-3)


def test_prefix_support_is_longest_feasible_prefix(problem):
    cm, qm, groups = problem
    budget = budget_of(cm, None, 0.5)
    order = torch.argsort(qm.w_bar.abs(), descending=True)
    mask = select_prefix(order, groups, budget)
    k = int(mask.sum())
    assert torch.equal(mask.nonzero().flatten().sort().values, order[:k].sort().values)
    assert cm.macs_of_mask(mask) <= budget.cost
    longer = mask.clone()
    longer[order[k]] = True
    assert cm.macs_of_mask(longer) > budget.cost


@pytest.mark.parametrize("kw, msg", [
    ({"step": "bogus"}, "step must be one of"),
    ({"max_iter": -1}, "max_iter must be an integer"),
    ({"rounds": 0}, "rounds must be an integer"),
    ({"active_factor": 0.5}, "active_factor has a bad value"),
    ({"ridges": ()}, "ridges must be positive"),
    ({"cost_exponents": (2.0,)}, "cost_exponents must lie in"),
    ({"tol": -1.0}, "tol has a bad value"),
    ({"saliencies": ("magnitude", "hessian")}, "saliencies must be a non-empty subset"),
    ({"saliencies": ()}, "saliencies must be a non-empty subset"),
    ({"obs_steps": 0}, "obs_steps must be an integer"),
])
def test_solver_options_are_validated(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        SolverOptions(**kw)


def test_solver_options_are_frozen_and_replace_validates():
    opts = SolverOptions(ridges=[1e-3, 1e-4])
    assert opts.ridges == (1e-3, 1e-4)  # lists become tuples
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.max_iter = 3
    changed = opts.replace(max_iter=3)
    assert changed.max_iter == 3 and opts.max_iter == 30 and changed.ridges == opts.ridges
    with pytest.raises(ConfigError, match="max_iter"):
        opts.replace(max_iter=-2)
    assert {f.name for f in dataclasses.fields(SolverOptions)}.isdisjoint(
        {"progress", "history", "timings"})


def test_obs_saliency_warm_starts_are_tried_and_meet_the_budgets(problem):
    cm, qm, groups = problem
    budget = budget_of(cm, None, 0.4)
    opts = SolverOptions(saliencies=("magnitude", "obs"), max_iter=0)
    trace = SolverTrace()
    res = solve("falcon", qm, groups, budget, opts, trace, evaluate=qm.value)
    tried = {(h["saliency"], h["beta"]) for h in trace.history if h.get("phase") == "warm start"}
    assert {("obs", b) for b in opts.cost_exponents} <= tried
    assert cm.macs_of_mask(res.mask) <= budget.cost
    assert res.source == "warm start" and res.iterations == 0
    # the chosen start is the best candidate by the score it was judged on
    best = min(h["score"] for h in trace.history if h.get("phase") == "warm start")
    assert qm.value(res.w) == pytest.approx(best)


def test_chita_searches_the_largest_count_that_meets_the_flop_budget(problem):
    cm, qm, groups = problem
    budget = budget_of(cm, None, 0.4)
    r = solve("chita", qm, groups, budget, SolverOptions(max_iter=5))
    assert cm.macs_of_mask(r.mask) <= budget.cost * (1 + 1e-12)
    # the bisection ends next to a count whose result is over the budget (p / 2000 < 1)
    k = int(r.mask.sum())
    bigger = solve("chita", qm, groups, Budget(k + 1, None), SolverOptions(max_iter=5))
    assert int(bigger.mask.sum()) == k + 1
    assert cm.macs_of_mask(bigger.mask) > budget.cost
