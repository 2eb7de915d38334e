import numpy as np
import pytest
import torch
from scipy.optimize import Bounds, LinearConstraint, milp

from falcon_prune.errors import ConfigError, ConfigTypeError
from falcon_prune.selection.groups import CostGroups
from falcon_prune.selection.ilp import solve_ilp
from falcon_prune.selection.weights import Budget, select_ilp, select_prefix, select_top


def exact(I, f, S, F, integral=True, floors=None, bounds=None):
    """The optimum by scipy's MILP (or LP), with per-layer floors when given."""
    p = len(I)
    A = np.vstack([np.ones(p), f])
    ub = [np.inf if S is None else S, np.inf if F is None else F]
    constraints = [LinearConstraint(A, -np.inf, ub)]
    if floors is not None:
        L = np.zeros((len(floors), p))
        for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            L[k, a:b] = 1
        constraints.append(LinearConstraint(L, np.array(floors), np.inf))
    res = milp(
        -I,
        constraints=constraints,
        integrality=np.ones(p) if integral else None,
        bounds=Bounds(0, 1),
        options={"mip_rel_gap": 0},
    )
    assert res.success
    return -res.fun


def check(I, f, S, F, groups=None):
    r = solve_ilp(torch.tensor(I), groups if groups is not None else torch.tensor(f), S, F)
    mask = r.mask.numpy()
    assert S is None or mask.sum() <= S
    assert F is None or f[mask].sum() <= F * (1 + 1e-12)
    assert r.kept == mask.sum()
    assert r.cost == pytest.approx(f[mask].sum())
    assert r.objective == pytest.approx(I[mask].sum())
    opt = exact(I, f, S, F)
    lp = exact(I, f, S, F, integral=False)
    two_items = np.sort(I)[-2:].sum()
    assert r.objective >= opt - two_items - 1e-9
    assert r.objective <= opt + 1e-9
    assert r.upper_bound >= opt - 1e-9
    assert r.upper_bound == pytest.approx(lp, rel=1e-7, abs=1e-9)
    assert r.gap == pytest.approx(r.upper_bound - r.objective)
    return r, opt


@pytest.mark.parametrize("seed", range(8))
def test_both_binding_layer_costs(seed):
    rng = np.random.default_rng(seed)
    p = 300
    I = rng.random(p) ** 2
    f = rng.choice([1.0, 9.0, 36.0, 144.0], p)
    # the count budget binds at the FLOP-only optimum, and the FLOP budget at the count-only one
    S, F = int(0.3 * p), 0.2 * f.sum()
    check(I, f, S, F)


@pytest.mark.parametrize("seed", range(4))
def test_arbitrary_per_weight_costs(seed):
    rng = np.random.default_rng(100 + seed)
    p = 700  # more distinct costs than the grouped path takes: the flat path runs
    I = rng.random(p)
    f = rng.random(p) * 5
    check(I, f, int(0.4 * p), 0.25 * f.sum())


def test_only_flop_binding():
    rng = np.random.default_rng(1)
    I, f = rng.random(200), rng.choice([1.0, 4.0, 16.0], 200)
    r, _ = check(I, f, None, 0.3 * f.sum())
    r2, _ = check(I, f, 200, 0.3 * f.sum())  # count budget slack
    assert r.kept == r2.kept


def test_only_count_binding_is_top_k():
    rng = np.random.default_rng(2)
    I, f = rng.random(200), rng.choice([1.0, 4.0, 16.0], 200)
    r, opt = check(I, f, 50, None)
    assert r.objective == pytest.approx(np.sort(I)[-50:].sum())
    assert r.gap == pytest.approx(0, abs=1e-9)


def test_ties():
    I = np.repeat([1.0, 0.5, 0.25], 100)
    f = np.tile([1.0, 2.0], 150)
    for S, F in [(120, 200.0), (None, 151.0), (77, None), (150, 160.0)]:
        check(I, f, S, F)


def test_layer_groups_equal_flat_costs():
    sizes = torch.tensor([40, 60, 30, 70])
    costs = torch.tensor([16.0, 4.0, 16.0, 1.0])
    f = torch.repeat_interleave(costs, sizes).numpy().astype(float)
    I = np.random.default_rng(3).random(200)
    groups = CostGroups.from_layers(costs, sizes)
    assert len(groups) == 3  # equal costs are merged
    r1, _ = check(I, f, 80, 0.3 * f.sum(), groups)
    r2, _ = check(I, f, 80, 0.3 * f.sum())
    assert torch.equal(r1.mask, r2.mask)


def test_budgets_larger_than_everything():
    I = np.random.default_rng(4).random(50)
    f = np.ones(50)
    r, _ = check(I, f, 1000, 1e9)
    assert r.kept == 50


def test_zero_budget():
    I, f = np.random.default_rng(5).random(50), np.ones(50)
    r = solve_ilp(torch.tensor(I), torch.tensor(f), 0, None)
    assert r.kept == 0 and r.upper_bound >= 0


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        (dict(scores=torch.tensor([1.0, float("nan")])), ConfigError, "NaN"),
        (dict(scores=torch.tensor([1.0, -1.0])), ConfigError, ">= 0"),
        (dict(scores=torch.tensor([1.0, 1.0, 1.0])), ConfigError, "entries"),
        (dict(max_count=-1), ConfigError, ">= 0"),
        (dict(max_cost=float("nan")), ConfigTypeError, "number"),
        (dict(max_cost="1"), ConfigTypeError, "number"),
        (dict(costs=torch.tensor([1.0, -1.0])), ConfigError, "finite and >= 0"),
        (dict(costs=torch.tensor([])), ConfigError, "empty"),
    ],
)
def test_bad_input(kwargs, err, match):
    args = dict(
        scores=torch.tensor([1.0, 2.0]), costs=torch.tensor([1.0, 1.0]), max_count=1, max_cost=1.0
    )
    args.update(kwargs)
    with pytest.raises(err, match=match):
        solve_ilp(**args)


def layered(seed, sizes=(30, 50, 20, 40), costs=(16.0, 4.0, 9.0, 1.0)):
    """Scores (p,), per-weight costs (p,), groups and layer bounds of a small network."""
    rng = np.random.default_rng(seed)
    sizes_t, costs_t = torch.tensor(sizes), torch.tensor(costs)
    f = torch.repeat_interleave(costs_t, sizes_t).numpy().astype(float)
    bounds = tuple([0, *np.cumsum(sizes).tolist()])
    return rng.random(len(f)) ** 2, f, CostGroups.from_layers(costs_t, sizes_t), bounds


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("S_frac,F_frac", [(0.1, 0.2), (None, 0.15), (0.12, None)])
def test_select_ilp_with_floors_is_near_the_constrained_optimum(seed, S_frac, F_frac):
    I, f, groups, bounds = layered(seed)
    floors = (3, 0, 5, 2)
    S = None if S_frac is None else int(S_frac * len(I))
    F = None if F_frac is None else F_frac * f.sum()
    r = select_ilp(torch.tensor(I), groups, Budget(S, F, floors, bounds))
    mask = r.mask.numpy()
    per_layer = [int(mask[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    assert all(k >= fl for k, fl in zip(per_layer, floors, strict=True)), per_layer
    assert S is None or mask.sum() <= S
    assert F is None or f[mask].sum() <= F * (1 + 1e-12)
    assert r.objective == pytest.approx(I[mask].sum())
    opt = exact(I, f, S, F, floors=floors, bounds=bounds)
    assert opt - np.sort(I)[-2:].sum() - 1e-9 <= r.objective <= opt + 1e-9
    assert r.upper_bound >= opt - 1e-9
    # without floors the cheap last layer would take most of the budget and some layer none
    free = select_ilp(torch.tensor(I), groups, Budget(S, F))
    assert free.objective >= r.objective - 1e-9


def test_select_prefix_and_top_keep_the_floors_first():
    I, f, groups, bounds = layered(0)
    floors = (2, 1, 1, 3)
    order = torch.argsort(torch.tensor(I), descending=True)
    budget = Budget(None, 0.15 * f.sum(), floors, bounds)
    mask = select_prefix(order, groups, budget)
    per_layer = [int(mask[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    assert all(k >= fl for k, fl in zip(per_layer, floors, strict=True))
    assert f[mask.numpy()].sum() <= budget.cost * (1 + 1e-12)
    # the forced weights are each layer's best by the order; the rest is a prefix of it
    forced = torch.zeros_like(mask)
    for k, a, b in zip(floors, bounds[:-1], bounds[1:], strict=True):
        layer = order[(order >= a) & (order < b)]
        forced[layer[:k]] = True
    rest = order[~forced[order]]
    n_rest = int((mask & ~forced).sum())
    assert bool(mask[forced].all()) and bool(mask[rest[:n_rest]].all())
    values = torch.tensor(I)
    top = select_top(values, 10, budget)
    assert int(top.sum()) == 10
    assert bool(top[forced].all())  # here |values| orders as I does


def test_budget_fits_and_restricted():
    b = Budget(10, 100.0, (2, 3), (0, 5, 12))
    assert b.fits(10, 100.0) and not b.fits(11, 1.0) and not b.fits(1, 100.1)
    assert Budget(None, None).fits(10**9, 1e30)
    allowed = torch.zeros(12, dtype=torch.bool)
    allowed[[0, 6, 7, 8, 9, 10]] = True  # 1 weight left in layer 0, 5 in layer 1
    r = b.restricted(allowed)
    assert r.bounds == (0, 1, 6) and r.floors == (1, 3)
    assert (r.count, r.cost) == (10, 100.0)


def test_value_sort_and_top_k_mask_with_ties():
    from falcon_prune.selection.ilp import _sort_values, _top_k_masks

    g = torch.Generator().manual_seed(0)
    x = torch.rand(50_000, generator=g, dtype=torch.float64) ** 2
    x[:5000] = 0.0
    x[5000:9000] = 0.25  # a tied block
    x = x[torch.randperm(50_000, generator=g)]
    asc = _sort_values(x.clone())
    assert torch.equal(asc, torch.sort(x).values)
    above = int((x > 0.25).sum())
    tied = (x == 0.25).nonzero().flatten()
    for k in (0, 1, above, above + 1, above + 1500, 50_000):
        for cuts in ([50_000], [7, 20_000, 50_000], [30_000, 30_001, 50_000]):
            pieces = list(torch.tensor_split(x, cuts[:-1]))
            mask = torch.cat(_top_k_masks(pieces, asc, k))
            assert int(mask.sum()) == k
            if 0 < k < 50_000:  # every kept value >= every dropped value
                assert x[mask].min() >= x[~mask].max()
            if above < k < 50_000:  # ties at the edge: the first ones by position
                taken = mask[tied]
                assert taken[: k - above].all() and not taken[k - above:].any()


def test_span_groups_match_index_groups_and_their_subsets():
    rng = torch.Generator().manual_seed(5)
    sizes = torch.randint(1, 40, (9,), generator=rng)
    costs = torch.tensor([4.0, 1.0, 4.0, 9.0, 1.0, 4.0, 2.0, 9.0, 1.0])
    spans = CostGroups.from_layers(costs, sizes)
    index = CostGroups.from_costs(torch.repeat_interleave(costs, sizes))
    assert [i.tolist() for i in spans.index] == [i.tolist() for i in index.index]
    keep = torch.rand(int(sizes.sum()), generator=rng) < 0.6
    keep[: int(sizes[0])] = False  # a layer left empty: its group may vanish
    a, b = spans.subset(keep), index.subset(keep)
    assert a.p == b.p == int(keep.sum()) and torch.equal(a.cost, b.cost)
    assert [i.tolist() for i in a.index] == [i.tolist() for i in b.index]
    scores = torch.rand(a.p, generator=rng, dtype=torch.float64)
    r1 = solve_ilp(scores, a, a.p // 3, 0.4 * a.total_cost)
    r2 = solve_ilp(scores, b, a.p // 3, 0.4 * a.total_cost)
    assert torch.equal(r1.mask, r2.mask) and abs(r1.objective - r2.objective) < 1e-9
