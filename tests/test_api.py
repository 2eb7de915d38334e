import math

import pytest
import torch
from helpers import same_state, small_data, state, trained_cnn
from torch import nn
from torch.nn.utils import prune as torch_prune

import falcon_prune as fp
from falcon_prune.fisher import MemoryBudgetError


@pytest.fixture(scope="module")
def model():
    return trained_cnn()


@pytest.fixture(scope="module")
def data():
    return small_data()


@pytest.mark.parametrize("method", fp.METHODS)
def test_prune_returns_masked_copy_within_budgets(model, data, method):
    before = state(model)
    r = fp.prune(model, data, flops=0.4, nnz=0.6, method=method, n_gradients=100,
                 n_validation=100, progress=False)
    assert same_state(model, before) and not any(
        torch_prune.is_pruned(m) for m in model.modules())
    assert all(torch_prune.is_pruned(m) for m in (r.model.c1, r.model.c2, r.model.fc))
    kept, dense = fp.count_macs(fp.make_permanent(fp.api.clone_model(r.model)), data[0][:1])
    assert r.flops_fraction == pytest.approx(kept / dense) and r.flops_fraction <= 0.4
    assert r.nnz_fraction <= 0.6
    plain = fp.make_permanent(fp.api.clone_model(r.model))
    weights = [m.weight for m in (plain.c1, plain.c2, plain.fc)]
    kept_weights = sum(int(w.count_nonzero()) for w in weights)
    assert r.nnz_fraction == pytest.approx(kept_weights / sum(w.numel() for w in weights))
    assert [row.kept for row in r.layers] == [int(w.count_nonzero()) for w in weights]
    assert {"costs", "solver", "total"} <= set(r.times)
    assert "c1" in r.table() and "FLOPs kept" in r.summary()
    assert r.to_dict()["method"] == method


def test_masks_keep_pruned_weights_at_zero_during_training(model, data):
    r = fp.prune(model, data, flops=0.3, method="falcon", n_gradients=100, progress=False)
    masks = fp.masks_of(r.model)
    opt = torch.optim.SGD(r.model.parameters(), lr=0.1)
    for _ in range(3):
        loss = nn.functional.cross_entropy(r.model(data[0]), data[1])
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name, mask in masks.items():
        w = dict(r.model.named_modules())[name].weight
        assert torch.all(w[~mask] == 0)
    plain = fp.make_permanent(r.model)
    assert not any(torch_prune.is_pruned(m) for m in plain.modules())


def test_deterministic_given_seed(model, data):
    a = fp.prune(model, data, flops=0.35, n_gradients=80, seed=3, progress=False)
    b = fp.prune(model, data, flops=0.35, n_gradients=80, seed=3, progress=False)
    for k, v in fp.masks_of(a.model).items():
        assert torch.equal(v, fp.masks_of(b.model)[k])


def test_already_pruned_model_is_accepted_and_untouched(model, data):
    first = fp.prune(model, data, flops=0.6, method="mp", progress=False)
    before = {k: v.clone() for k, v in first.model.state_dict().items()}
    second = fp.prune(first.model, data, flops=0.3, n_gradients=60, progress=False)
    assert second.flops_fraction <= 0.3
    after = first.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("kw, exc, msg", [
    ({"flops": 0.0}, ValueError, "not a fraction in"),
    ({"flops": 1.5}, ValueError, "not a fraction in"),
    ({"flops": math.nan}, ValueError, "not a fraction in"),
    ({"flops": "0.3"}, TypeError, "must be a number"),
    ({"nnz": True}, TypeError, "must be a number"),
    ({}, ValueError, "at least one budget"),
    ({"flops": 0.3, "method": "magic"}, ValueError, "unknown method"),
    ({"flops": 0.3, "n_gradients": 10_000}, ValueError, "lower n_gradients"),
    ({"flops": 0.3, "n_gradients": 0}, ValueError, "positive integer"),
    ({"flops": 0.3, "memory_limit": 10_000}, MemoryBudgetError, "memory limit"),
    ({"flops": 0.3, "alpha": -1.0}, ValueError, "alpha"),
    ({"flops": 0.3, "ridge": 0.0}, ValueError, "ridge must be > 0"),
    ({"flops": 0.3, "block_size": 0}, ValueError, "block_size"),
    ({"flops": 0.3, "dtype": torch.int32}, ValueError, "dtype must be one of"),
    ({"flops": 0.3, "storage": "cloud"}, ValueError, "storage must be one of"),
    ({"flops": 0.3, "device": "tpu9"}, ValueError, "not a torch device"),
    ({"flops": 0.3, "options": {"max_iter": 3}}, TypeError, "SolverOptions"),
    ({"flops": 0.3, "schedule": "cubic"}, ValueError, "belong to method='falcon\\+\\+'"),
    ({"flops": 0.3, "stages": 3}, ValueError, "single-stage"),
    ({"flops": 0.3, "revive": True}, ValueError, "single-stage"),
    ({"flops": 0.3, "method": "falcon++", "schedule": fp.Schedule(4), "stages": 3}, ValueError,
     "disagrees"),
])
def test_bad_input_is_refused_and_model_unchanged(model, data, kw, exc, msg):
    before = state(model)
    args = {"method": "falcon", "n_gradients": 50, "progress": False, **kw}
    with pytest.raises(exc, match=msg):
        fp.prune(model, data, **args)
    assert same_state(model, before)


def test_bad_data_is_refused(model, data):
    before = state(model)
    x, y = data
    nan_x = x.clone()
    nan_x[5] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        fp.prune(model, (nan_x, y), flops=0.5, n_gradients=50, progress=False)
    with pytest.raises(ValueError, match="shape"):
        fp.prune(model, (x.reshape(len(x), -1), y), flops=0.5, n_gradients=50, progress=False)
    with pytest.raises(TypeError, match="data must be"):
        fp.prune(model, 42, flops=0.5, progress=False)
    assert same_state(model, before)


def test_model_without_prunable_layers(data):
    with pytest.raises(ValueError, match="no prunable layers"):
        fp.prune(nn.Sequential(nn.Flatten(), nn.ReLU()), data, flops=0.5, progress=False)


def test_unknown_model_type(data):
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fp.prune("resnet20", data, flops=0.5, progress=False)


def test_mlp_flops_equal_nnz(data):
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 16, bias=False), nn.ReLU(),
                        nn.Linear(16, 4, bias=False))
    r = fp.prune(mlp, data, flops=0.5, method="mp", progress=False)
    assert r.flops_fraction == pytest.approx(r.nnz_fraction)


def test_a_data_loader_counts_samples_not_batches(model, data):
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(*data), batch_size=32)
    r = fp.prune(model, loader, flops=0.4, method="falcon", n_gradients=100, n_validation=100,
                 progress=False)
    assert r.flops_fraction <= 0.4
    with pytest.raises(ValueError, match="the data has 240"):
        fp.prune(model, loader, flops=0.4, n_gradients=241, progress=False)


def test_a_list_of_batches_counts_its_samples_as_read(model, data):
    """A list of (x, y) batches is not a data set of that many samples; held-out samples
    are optional, so fewer than n_gradients + n_validation is fine."""
    x, y = data
    batches = [(x[i : i + 40], y[i : i + 40]) for i in range(0, len(x), 40)]
    r = fp.prune(model, batches, flops=0.4, method="falcon", n_gradients=100,
                 progress=False)  # n_validation 1000 by default: 140 are there
    assert r.flops_fraction <= 0.4
    assert r.details["selection"] == "held-out loss on 140 samples"
    with pytest.raises(ValueError, match="asked for 241 samples but the data has only 240"):
        fp.prune(model, iter(batches), flops=0.4, n_gradients=241, progress=False)


def test_active_set_and_rounds_keep_the_support_inside_the_set(model, data):
    opts = fp.SolverOptions(active_factor=1.5, rounds=2, max_iter=5, step="linesearch",
                            progress=False)
    r = fp.prune(model, data, flops=0.4, method="falcon", n_gradients=100, n_validation=0,
                 options=opts, progress=False)
    w = torch.cat([m.weight.detach().reshape(-1) for m in (model.c1, model.c2, model.fc)])
    mask = torch.cat([fp.masks_of(r.model)[k].reshape(-1) for k in ("c1", "c2", "fc")])
    base = fp.prune(model, data, flops=0.4, method="mp_flops", progress=False)
    k = math.ceil(1.5 * round(base.nnz_fraction * base.num_weights))
    active = torch.zeros_like(mask)
    active[torch.topk(w.abs(), k).indices] = True
    assert bool((mask <= active).all()) and r.flops_fraction <= 0.4
    assert r.details["iterations"] >= 1
