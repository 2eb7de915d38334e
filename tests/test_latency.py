"""Latency budgets (``latency=``, structure='channels'): the measured layer-time table,
the greedy choice under it, and the run's checks and refusals."""

import pytest
import torch
from helpers import (
    BatchNormCNN,
    DepthwiseNet,
    HeadAttentionNet,
    TinyResNet,
    same_state,
    small_data,
    state,
)
from torch import nn

import falcon_prune as fp
from falcon_prune.analysis.costs import CostModel
from falcon_prune.analysis.structure import channel_units
from falcon_prune.analysis.timing import LatencyTable, sliced
from falcon_prune.data.tasks import as_task
from falcon_prune.errors import BudgetError, ConfigError, FalconPruneError
from falcon_prune.selection.units import UnitBudget, UnitCosts, select_latency

TASK = as_task(None)
KW = dict(structure="channels", progress=False, n_gradients=60, n_validation=60)


@pytest.fixture(autouse=True)
def clock(request):
    """Every test here times by shapes (``shape_clock``: the same on any machine, busy or
    idle), but the one marked ``real_clock``."""
    if "real_clock" not in request.keywords:
        request.getfixturevalue("shape_clock")


def image_data(channels=3, n=200, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, channels, size, size, generator=g), torch.randint(0, 3, (n,),
                                                                               generator=g)


def WideResNet():  # noqa: N802 (a model class in the other tests)
    """TinyResNet with 24 residual and 16 inner channels on 3-channel images: wide enough
    that its time is the convolutions', not the per-call overhead."""
    return TinyResNet(width=24, inner=16, in_channels=3, classes=3)


def table_of(model, x):
    cm = CostModel.from_model(model, x, TASK.call)
    units = channel_units(model, cm, x, TASK.call)
    return LatencyTable(model, units, cm, x, TASK.call, torch.device("cpu"), repeats=3), units


def test_sliced_layers_compute_the_first_channels():
    torch.manual_seed(0)
    conv, dw, lin = nn.Conv2d(6, 5, 3, padding=1), nn.Conv2d(6, 6, 3, groups=6), nn.Linear(6, 5)
    x = torch.randn(2, 6, 7, 7)
    with torch.no_grad():
        thin, xs = sliced(conv, x, 3, 4)
        ref = nn.functional.conv2d(x[:, :4], conv.weight[:3, :4], conv.bias[:3], padding=1)
        assert torch.allclose(thin(xs), ref, atol=1e-6)
        thin, xs = sliced(dw, x, 4, 6)  # depthwise: its input channels are its outputs
        assert thin.groups == 4 and torch.allclose(thin(xs), dw(x)[:, :4], atol=1e-6)
        thin, xs = sliced(lin, x[:, :, 0, 0], 2, 3)
        assert torch.allclose(thin(xs), x[:, :3, 0, 0] @ lin.weight[:2, :3].T + lin.bias[:2],
                              atol=1e-6)
    assert conv.weight.shape == (5, 6, 3, 3)  # the originals are untouched


def test_table_maps_groups_to_layer_widths_on_a_residual_network():
    model = TinyResNet().eval()
    x = small_data()[0][:8]
    table, units = table_of(model, x)
    L = table.layers
    assert len(units.groups) == 2 and len(L["stem"].out_terms) == 1
    res = L["stem"].out_terms[0][0]
    mid = 1 - res
    assert int((units.group == res).sum()) == 6 and int((units.group == mid).sum()) == 5
    assert L["stem"].in_terms == []
    assert L["conv1"].out_terms == [(mid, 1)] and L["conv1"].in_terms == [(res, 1)]
    assert L["conv2"].out_terms == [(res, 1)] and L["conv2"].in_terms == [(mid, 1)]
    assert L["fc"].out_terms == [] and L["fc"].in_terms == [(res, 1)]
    dead = [0] * len(units.groups)
    dead[res], dead[mid] = 2, 1
    assert L["conv1"].widths(dead) == (4, 4) and L["conv2"].widths(dead) == (4, 4)
    assert L["fc"].widths(dead) == (4, 4)
    # the dense prediction is the measured total (the rest is kept whole)
    assert table.seconds([0] * len(units.groups)) == pytest.approx(table.total, rel=1e-9)
    assert all(v > 0 for v in table.table.values())
    # calibration scales the table's saving so that one measured choice is predicted as
    # measured, and leaves the dense prediction alone (a stand-in sum: 0.6 of the total)
    table.raw_seconds = lambda d: table.total if not any(d) else 0.6 * table.total
    table.calibrate(dead, 1 - 0.8 * 0.4)
    assert table.scale == pytest.approx(0.8)
    assert table.seconds(dead) / table.total == pytest.approx(1 - 0.8 * 0.4)
    assert table.seconds([0] * len(units.groups)) == pytest.approx(table.total)
    table.calibrate(dead, 1 - 5 * 0.4)  # far off: clamped
    assert table.scale == 2.0
    table.calibrate(dead, 1.0)
    assert table.scale == 0.5


def test_table_of_a_depthwise_network():
    model = DepthwiseNet().eval()
    x = image_data()[0][:8]
    table, units = table_of(model, x)
    g = table.layers["dw"].out_terms[0][0]
    assert table.layers["c1"].out_terms == [(g, 1)] and table.layers["pw"].in_terms == [(g, 1)]
    dead = [0] * len(units.groups)
    dead[g] = 3
    assert table.layers["dw"].widths(dead) == (5, 5)  # its inputs are its outputs
    assert table.layer_seconds("dw", 5, 5) > 0 and ("dw", 5, 5) in table.table


class StepTable:
    """A stand-in table whose time drops in a step: a group costs 10 s while it keeps more
    than 4 units, 1 s at 4 or fewer (like a kernel that changes with the channel count)."""

    def __init__(self, sizes):
        self.sizes, self.total = sizes, 10.0 * len(sizes)

    def seconds(self, dead):
        return sum(10.0 if n - d > 4 else 1.0 for n, d in zip(self.sizes, dead, strict=True))


class CountTable(StepTable):
    """A stand-in table whose time is the units kept: any budget below it cuts every group
    to its floor."""

    def seconds(self, dead):
        return float(sum(n - d for n, d in zip(self.sizes, dead, strict=True)))


def unit_costs(units, cm, model):
    from falcon_prune.analysis.structure import ParamSpace

    space = ParamSpace.of(model, cm)
    cost = torch.zeros(space.size, dtype=torch.float64)
    sel = space.flat >= 0
    cost[sel] = cm.per_weight_costs()[space.flat[sel]]
    return UnitCosts(units, cost)


def test_greedy_choice_crosses_a_step_and_fits_every_budget():
    model = BatchNormCNN().eval()
    x = small_data()[0][:8]
    cm = CostModel.from_model(model, x, TASK.call)
    units = channel_units(model, cm, x, TASK.call)
    costs = unit_costs(units, cm, model)
    sizes = torch.bincount(units.group).tolist()
    table = StepTable(sizes)
    scores = torch.linspace(1, 2, units.m, dtype=torch.float64)
    floors = torch.ones(len(sizes), dtype=torch.int64)
    allowed = torch.ones(units.m, dtype=torch.bool)
    # 11 s: one group must cross its step (to 4 units), the other stays whole
    keep = select_latency(scores, costs, UnitBudget(None, None, floors, 11.0), allowed, 1,
                          table)
    kept = torch.bincount(units.group[keep], minlength=len(sizes)).tolist()
    assert table.seconds([n - k for n, k in zip(sizes, kept, strict=True)]) <= 11.0
    assert sorted(k <= 4 for k in kept) == [False, True]
    assert max(kept) == max(sizes)  # the fill gave back every unit that costs no time
    # with a FLOP budget too, both hold
    dense, _ = costs.exact(allowed)
    keep = select_latency(scores, costs, UnitBudget(0.5 * dense, None, floors, 11.0),
                          allowed, 1, table)
    kept = torch.bincount(units.group[keep], minlength=len(sizes)).tolist()
    assert costs.exact(keep)[0] <= 0.5 * dense
    assert table.seconds([n - k for n, k in zip(sizes, kept, strict=True)]) <= 11.0
    assert all(k >= 1 for k in kept)


def test_greedy_choice_keeps_the_floors_of_a_group_of_heads():
    """Blocks of round_to units are single heads in a group of heads, so a floor of 2
    heads keeps 2 heads (not one block of 4 rounded to one head)."""
    model = HeadAttentionNet().eval()
    x = torch.randn(2, 5, 8)
    cm = CostModel.from_model(model, x, TASK.call)
    units = channel_units(model, cm, x, TASK.call)
    heads = [g for g, w in enumerate(units.widths) if w > 1]
    assert heads
    sizes = torch.bincount(units.group).tolist()
    floors = torch.tensor([2 if g in heads else 1 for g in range(len(sizes))])
    table = CountTable(sizes)
    everything = torch.ones(units.m, dtype=torch.bool)
    keep = select_latency(torch.ones(units.m, dtype=torch.float64), unit_costs(units, cm, model),
                          UnitBudget(None, None, floors, float(floors.sum())), everything, 4,
                          table)
    kept = torch.bincount(units.group[keep], minlength=len(sizes)).tolist()
    assert [kept[g] for g in heads] == [2] * len(heads)


@pytest.mark.filterwarnings("ignore:the pruned network ran")
@pytest.mark.parametrize("method", ["mp_flops", "falcon", "falcon++"])
def test_a_latency_budget_gives_a_smaller_network_with_its_measured_time(method):
    torch.manual_seed(0)
    model = WideResNet().eval()
    data = image_data(size=16)
    before = state(model)
    kw = dict(KW, stages=2) if method == "falcon++" else dict(KW)
    if method == "mp_flops":
        kw = dict(structure="channels", progress=False)
    r = fp.prune(model, data, flops=0.8, latency=0.85, method=method, latency_batch=16, **kw)
    lat = r.details["latency"]
    assert lat["batch"] == 16 and lat["budget"] == 0.85
    assert lat["predicted_fraction"] <= 0.85 + 1e-9
    assert 0.5 <= lat["calibration"]["scale"] <= 2.0
    assert lat["measured_fraction"] > 0 and lat["dense_ms"] > 0 and lat["pruned_ms"] > 0
    assert r.flops_fraction <= 0.8
    assert r.config.latency_batch == 16 and r.config.round_to == 4
    assert sum(p.numel() for p in r.model.parameters()) < sum(p.numel()
                                                              for p in model.parameters())
    if method == "falcon++":
        assert all("latency_predicted" in s and "latency_budget" in s for s in r.stages)
    assert same_state(model, before)


@pytest.mark.filterwarnings("ignore:the pruned network ran")
def test_latency_with_every_channel_count():
    r = fp.prune(WideResNet().eval(), image_data(size=16), latency=0.85, method="mp_flops",
                 structure="channels", progress=False, round_to=1, latency_batch=16)
    assert r.config.latency_batch == 16 and r.config.round_to == 1
    assert r.flops_budget is None and r.details["latency"]["predicted_fraction"] <= 0.85 + 1e-9


@pytest.mark.real_clock
@pytest.mark.filterwarnings("ignore:the pruned network ran")
def test_a_latency_budget_with_the_real_clock():
    """The real timers, once: whatever this machine's speed and load, the run measures
    both networks and reports its table (a machine too busy to see any saving is told so
    with a BudgetError before any pruning)."""
    try:
        r = fp.prune(WideResNet().eval(), image_data(size=16), latency=0.9, method="mp_flops",
                     structure="channels", progress=False, latency_batch=16)
    except BudgetError as e:
        assert "latency budget keeps" in str(e)
        return
    lat = r.details["latency"]
    assert lat["dense_ms"] > 0 and lat["pruned_ms"] > 0 and lat["widths_timed"] > 0
    assert 0.5 <= lat["calibration"]["scale"] <= 2.0


@pytest.mark.parametrize("kw, exc, match", [
    (dict(latency=0.5), ConfigError, "structure='channels'"),
    (dict(latency=0.5, structure="channels", method="mp"), ConfigError, "mp_flops"),
    (dict(latency=0.5, nnz=0.5, structure="channels", method="mp_flops"), BudgetError,
     "not both"),
    (dict(latency_batch=8, structure="channels", method="mp_flops", flops=0.5), ConfigError,
     "latency_batch"),
    (dict(latency=1.5, structure="channels", method="mp_flops"), ValueError, "latency"),
    (dict(latency=0.5, latency_batch=0, structure="channels", method="mp_flops"),
     ConfigError, "latency_batch"),
    (dict(latency=0.01, structure="channels", method="mp_flops", min_density=0.9),
     BudgetError, "latency budget keeps"),
])
def test_latency_refusals(kw, exc, match):
    model = TinyResNet().eval()
    before = state(model)
    with pytest.raises(exc, match=match) as info:
        fp.prune(model, small_data(), progress=False, **kw)
    assert isinstance(info.value, FalconPruneError)
    assert same_state(model, before)


def side_by_side(fake):
    """timing.side_by_side with its interleaved timings replaced by ``fake``."""
    def measure(call, inputs, dense, small, device):
        secs = fake({"dense": lambda: call(dense, inputs),
                     "pruned": lambda: call(small, inputs)}, 14, device)
        return {"measured_fraction": secs["pruned"] / secs["dense"],
                "dense_ms": secs["dense"] * 1e3, "pruned_ms": secs["pruned"] * 1e3}
    return measure


def test_a_network_measured_over_the_budget_gets_another_stage(monkeypatch):
    """The measured check drives extra stages: a first measurement over the budget makes
    the run prune once more with the table's budget lowered by the prediction's error."""
    import falcon_prune.runs.latency as latency_runs

    measured = iter([0.5, 0.9, 0.5])  # the calibration, then the checks

    def fake(runs, repeats, device, repeat_seconds=0.004):
        for fn in runs.values():
            fn()
        return {"dense": 1.0, "pruned": next(measured)}

    monkeypatch.setattr(latency_runs, "side_by_side", side_by_side(fake))
    r = fp.prune(WideResNet().eval(), image_data(size=16), flops=0.9, latency=0.8,
                 method="falcon", latency_batch=16, **KW)
    lat = r.details["latency"]
    assert lat["calibration"]["measured_fraction"] == 0.5
    assert lat["extra_stages"] == 1 and len(lat["rounds"]) == 2
    first, second = lat["rounds"]
    assert first["table_budget"] == 0.8 and first["measured_fraction"] == 0.9
    assert second["table_budget"] == pytest.approx(first["predicted_fraction"] * 0.8 / 0.9)
    # it pruned further (down to the floors at most, so not always to the lower budget)
    assert second["predicted_fraction"] <= first["predicted_fraction"] + 1e-9
    assert lat["measured_fraction"] == 0.5 and r.flops_fraction <= 0.9


def test_the_extra_stages_stop_and_warn(monkeypatch):
    import falcon_prune.runs.latency as latency_runs

    measured = iter([0.5] + [0.95] * 3)  # the calibration, then every check

    def fake(runs, repeats, device, repeat_seconds=0.004):
        return {"dense": 1.0, "pruned": next(measured)}

    monkeypatch.setattr(latency_runs, "side_by_side", side_by_side(fake))
    with pytest.warns(UserWarning, match="above the latency budget 0.80, after 2 extra"):
        r = fp.prune(WideResNet().eval(), image_data(size=16), latency=0.8,
                     method="mp_flops", latency_batch=16, structure="channels",
                     progress=False)
    assert r.details["latency"]["extra_stages"] == 2


def test_a_latency_budget_is_refused_under_torchrun(monkeypatch):
    import falcon_prune.api as api

    class Active:
        active = True

    monkeypatch.setattr(api.Ranks, "current", staticmethod(lambda: Active()))
    model = TinyResNet().eval()
    before = state(model)
    with pytest.raises(ConfigError, match="one process; run it without torchrun"):
        fp.prune(model, small_data(), latency=0.5, structure="channels", method="mp_flops",
                 progress=False)
    assert same_state(model, before)
