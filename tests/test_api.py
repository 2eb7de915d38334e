"""prune(): results, budgets, configuration, determinism and floors."""

import json
import math

import pytest
import torch
from helpers import SmallCNN, TinyAttention, global_methods, same_state, small_data, state
from torch import nn
from torch.nn.utils import prune as torch_prune
from torch.utils.data import DataLoader, TensorDataset

import falcon_prune as fp
from falcon_prune.errors import BudgetError, ConfigError


def kwargs_for(method, n=100):
    """Settings each method uses (a setting a method does not use is refused)."""
    kw = {}
    if method in ("woodfisher", "chita", "falcon", "falcon++"):
        kw["n_gradients"] = n
    if method in ("falcon", "falcon++"):
        kw["n_validation"] = 100
    if method == "falcon++":
        kw["stages"] = 2
    return kw


def layer_weights(model):
    plain = fp.make_permanent(fp.clone_model(model))
    return [m.weight for m in (plain.c1, plain.c2, plain.fc)]


@pytest.mark.parametrize("method", global_methods())
def test_prune_returns_masked_copy_within_budgets(cnn, data, method):
    before = state(cnn)
    r = fp.prune(cnn, data, flops=0.4, nnz=0.6, method=method, progress=False,
                 **kwargs_for(method))
    assert same_state(cnn, before) and not any(torch_prune.is_pruned(m) for m in cnn.modules())
    assert all(torch_prune.is_pruned(m) for m in (r.model.c1, r.model.c2, r.model.fc))
    kept, dense = fp.count_macs(r.model, data[0][:1])
    assert r.flops_fraction == pytest.approx(kept / dense) and r.flops_fraction <= 0.4
    weights = layer_weights(r.model)
    kept_weights = sum(int(w.count_nonzero()) for w in weights)
    assert r.nnz_fraction == pytest.approx(kept_weights / sum(w.numel() for w in weights))
    assert r.nnz_fraction <= 0.6
    assert [row.kept for row in r.layers] == [int(w.count_nonzero()) for w in weights]
    assert {"costs", "solver", "total"} <= set(r.times)
    assert "c1" in r.table() and "FLOPs kept" in r.summary()
    report = json.loads(json.dumps(r.to_dict()))
    assert report["method"] == method and report["config"]["method"] == method


def test_masks_keep_pruned_weights_at_zero_during_training(cnn, data):
    r = fp.prune(cnn, data, flops=0.3, n_gradients=100, progress=False)
    masks = fp.masks_of(r.model)
    opt = torch.optim.SGD(r.model.parameters(), lr=0.1)
    for _ in range(3):
        loss = nn.functional.cross_entropy(r.model(data[0]), data[1])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert sorted(masks) == ["c1.weight", "c2.weight", "fc.weight"]
    for name, mask in masks.items():
        assert torch.all(r.model.get_submodule(name.rpartition(".")[0]).weight[~mask] == 0)
    plain = fp.make_permanent(r.model)
    assert not any(torch_prune.is_pruned(m) for m in plain.modules())


def mask_vector(model):
    m = fp.masks_of(model)
    return torch.cat([m[k].reshape(-1) for k in ("c1.weight", "c2.weight", "fc.weight")])


@pytest.mark.parametrize("form", ["tensors", "dataset"])
def test_seed_decides_the_samples_and_the_result(cnn, data, form):
    """The same seed gives the same masks; another seed draws other samples (for tensors
    too) and gives another result, so a seed that is ignored is noticed."""
    d = data if form == "tensors" else TensorDataset(*data)
    kw = dict(flops=0.35, n_gradients=80, n_validation=80, progress=False)
    a = fp.prune(cnn, d, seed=3, **kw)
    b = fp.prune(cnn, d, seed=3, **kw)
    c = fp.prune(cnn, d, seed=4, **kw)
    assert torch.equal(mask_vector(a.model), mask_vector(b.model))
    assert not torch.equal(mask_vector(a.model), mask_vector(c.model))
    first = fp.prune(cnn, d, seed=3, sampling="first", **kw)
    other = fp.prune(cnn, d, seed=4, sampling="first", **kw)
    assert torch.equal(mask_vector(first.model), mask_vector(other.model))
    assert a.config.sampling == "random" and first.config.sampling == "first"


@pytest.mark.parametrize("method", ["falcon", "falcon++", "mp"])
def test_the_callers_rng_state_is_left_untouched(cnn, data, method):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    fp.prune(cnn, data, flops=0.4, method=method, progress=False, **kwargs_for(method, 60))
    assert torch.equal(torch.get_rng_state(), before)


def test_result_config_holds_every_setting_used(cnn, data, bfloat16_hardware):
    r = fp.prune(cnn, data, flops=0.4, n_gradients=100, progress=False)
    c = r.config
    assert (c.method, c.n_gradients, c.samples_per_gradient, c.alpha) == ("falcon", 100, 1, 0.0)
    assert c.n_validation == 140  # 1000 asked by default, 240 - 100 left in the data
    assert c.sampling == "random" and c.task.name == "classification"
    assert c.solver == fp.SolverOptions() and c.schedule is None
    d = r.to_dict()["config"]
    assert d["n_validation"] == 140 and d["task"] == "classification"
    assert d["dtype"] == "float32" and d["solver"]["max_iter"] == 30
    pp = fp.prune(cnn, data, flops=0.4, method="falcon++", n_gradients=50, stages=2,
                  progress=False)
    assert pp.config.samples_per_gradient == 2 and pp.config.alpha == 0.01
    # 'auto' precisions are decided when the run starts, for this model on this device
    auto = "bfloat16" if bfloat16_hardware else "model"
    assert pp.config.gradient_precision == pp.config.held_out_precision == auto
    assert pp.config.schedule.stages == 2 and pp.config.schedule.min_step == 0.01
    assert pp.config.solver == fp.multistage_options()


def test_defaults_table_and_config_argument(cnn, data):
    assert fp.defaults("mp").n_gradients is None and fp.defaults("mp").solver is None
    assert fp.defaults("falcon").n_gradients == 1000 and fp.defaults("falcon").schedule is None
    ms = fp.defaults("falcon++")
    assert (ms.samples_per_gradient, ms.n_validation, ms.resample) == (2, 1000, True)
    cfg = fp.defaults("falcon").replace(n_gradients=70, n_validation=50)
    r = fp.prune(cnn, data, flops=0.4, config=cfg, ridge=1e-2, progress=False)
    assert (r.config.n_gradients, r.config.n_validation, r.config.ridge) == (70, 50, 1e-2)
    with pytest.raises(ConfigError, match="config.method"):
        fp.prune(cnn, data, flops=0.4, method="mp", config=cfg, progress=False)
    with pytest.raises(ConfigError, match="unknown method"):
        fp.defaults("magic")


@pytest.mark.parametrize(("method", "kw", "match"), [
    ("mp", {"n_gradients": 100}, "does not use n_gradients"),
    ("falcon", {"stages": 3}, "single-stage"),
    ("falcon", {"resample": True}, "single-stage"),
    ("woodfisher", {"n_validation": 10}, "held-out"),
    ("mp_flops", {"solver": fp.SolverOptions()}, "solver options"),
    ("falcon", {"n_gradient": 100}, "did you mean n_gradients"),
])
def test_settings_a_method_does_not_use_are_refused(cnn, data, method, kw, match):
    with pytest.raises(ConfigError, match=match):
        fp.prune(cnn, data, flops=0.4, method=method, progress=False, **kw)


def test_already_pruned_model_is_accepted_and_untouched(cnn, data):
    first = fp.prune(cnn, data, flops=0.6, method="mp", progress=False)
    before = {k: v.clone() for k, v in first.model.state_dict().items()}
    second = fp.prune(first.model, data, flops=0.3, n_gradients=60, progress=False)
    assert second.flops_fraction <= 0.3
    after = first.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    zero_before = torch.cat([w.reshape(-1) == 0 for w in layer_weights(first.model)])
    kept_after = torch.cat([w.reshape(-1) != 0 for w in layer_weights(second.model)])
    assert not (zero_before & kept_after).any()  # incoming zeros stay pruned


def test_a_data_loader_counts_samples_not_batches(cnn, data):
    loader = DataLoader(TensorDataset(*data), batch_size=32)
    r = fp.prune(cnn, loader, flops=0.4, n_gradients=100, n_validation=100, progress=False)
    assert r.flops_fraction <= 0.4
    with pytest.raises(fp.errors.DataError, match="the data has only 240"):
        fp.prune(cnn, loader, flops=0.4, n_gradients=241, progress=False)


def test_a_list_of_batches_counts_its_samples(cnn, data):
    x, y = data
    batches = [(x[i : i + 40], y[i : i + 40]) for i in range(0, len(x), 40)]
    r = fp.prune(cnn, batches, flops=0.4, n_gradients=100, progress=False)
    assert r.flops_fraction <= 0.4
    assert r.details["selection"] == "held-out loss on 140 samples"
    with pytest.raises(fp.errors.DataError, match="asked for 241 samples but the data has only"):
        fp.prune(cnn, iter(batches), flops=0.4, n_gradients=241, progress=False)


def test_active_set_and_rounds_keep_the_support_inside_the_set(cnn, data):
    opts = fp.SolverOptions(active_factor=1.5, rounds=2, max_iter=5, step="linesearch")
    r = fp.prune(cnn, data, flops=0.4, n_gradients=100, n_validation=0, solver=opts,
                 allow_empty_layers=True, sampling="first", progress=False)
    assert r.details["source"] == "iht"  # the IHT result, whose support the set bounds
    w = torch.cat([m.weight.detach().reshape(-1) for m in (cnn.c1, cnn.c2, cnn.fc)])
    mask = mask_vector(r.model)
    base = fp.prune(cnn, data, flops=0.4, method="mp_flops", allow_empty_layers=True,
                    progress=False)
    k = math.ceil(1.5 * round(base.nnz_fraction * base.num_weights))
    active = torch.zeros_like(mask)
    active[torch.topk(w.abs(), k).indices] = True
    assert bool((mask <= active).all()) and r.flops_fraction <= 0.4
    assert r.details["iterations"] >= 1


def test_recalibrate_bn_changes_statistics_but_not_the_mask(bn_cnn, data):
    kw = dict(flops=0.3, n_gradients=80, n_validation=80, seed=1, progress=False)
    plain = fp.prune(bn_cnn, data, **kw)
    recal = fp.prune(bn_cnn, data, recalibrate_bn=100, **kw)
    a, b = fp.masks_of(plain.model), fp.masks_of(recal.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(plain.model.b1.running_mean, recal.model.b1.running_mean)
    assert recal.details["batchnorm"].endswith("re-estimated on 100 samples after pruning")
    assert plain.details["batchnorm"] == "running statistics kept as trained"


def faint_first_layer_cnn():
    """SmallCNN whose first layer's weights are tiny: magnitude pruning empties it."""
    torch.manual_seed(0)
    m = SmallCNN().eval()
    with torch.no_grad():
        m.c1.weight.mul_(1e-4)
    return m


def test_layers_keep_one_weight_unless_allowed_to_empty():
    m, data = faint_first_layer_cnn(), small_data()
    empty = fp.prune(m, data, nnz=0.3, method="mp", allow_empty_layers=True, progress=False)
    assert empty.layers[0].kept == 0  # the faint layer is emptied: its output is constant
    kept = fp.prune(m, data, nnz=0.3, method="mp", progress=False)
    assert all(row.kept >= 1 for row in kept.layers) and kept.nnz_fraction <= 0.3


@pytest.mark.parametrize("method", ["mp", "mp_flops", "woodfisher", "chita", "falcon"])
def test_min_density_keeps_a_floor_in_every_layer(cnn, data, method):
    r = fp.prune(cnn, data, flops=0.3, method=method, min_density=0.25, progress=False,
                 **kwargs_for(method, 60))
    assert all(row.kept >= math.ceil(0.25 * row.weights) for row in r.layers)
    assert r.flops_fraction <= 0.3


def test_budgets_below_the_floors_are_refused_before_any_work(cnn, data):
    with pytest.raises(BudgetError, match="allow_empty_layers=True"):
        fp.prune(cnn, data, flops=1e-4, n_gradients=100, progress=False)
    with pytest.raises(BudgetError, match="lower min_density"):
        fp.prune(cnn, data, nnz=0.2, min_density=0.5, method="mp", progress=False)


def test_multihead_attention_weights_count_and_the_budget_holds():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 5, 8, generator=g), torch.randint(0, 3, (200,), generator=g)
    r = fp.prune(TinyAttention(), (x, y), flops=0.3, n_gradients=60, n_validation=60,
                 progress=False)
    out_proj = next(row for row in r.layers if row.name == "mha.out_proj.weight")
    assert out_proj.macs_dense == 16 * 16 * 5  # five tokens: never counted as free
    kept, dense = fp.count_macs(r.model, x[:1])
    assert kept / dense == pytest.approx(r.flops_fraction) and r.flops_fraction <= 0.3


def test_a_weight_the_cost_model_cannot_count_is_left_dense_and_reported():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(64, 16)
            self.b = nn.Linear(16, 4)

        def forward(self, x):
            h = torch.relu(x.flatten(1) @ (self.a.weight * 2).T)  # read through aten.mul
            return self.b(h)

    x, y = small_data()
    m = Scaled()
    r = fp.prune(m, (x, y), flops=0.5, n_gradients=60, n_validation=60, progress=False)
    assert [e.name for e in r.excluded] == ["a.weight"] and "aten.mul" in r.excluded[0].reason
    assert torch.equal(fp.make_permanent(r.model).a.weight, m.a.weight)  # dense
    assert [row.name for row in r.layers] == ["b.weight"] and "outside the budgets" in r.table()
