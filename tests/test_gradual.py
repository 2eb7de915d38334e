"""Gradual pruning with fine-tuning, checkpoints and resume."""

import pytest
import torch
from helpers import BatchNormCNN, same_state, small_data, state, trained_cnn
from torch.utils.data import DataLoader, TensorDataset

import falcon_prune as fp
from falcon_prune.gradual import recalibrate_batchnorm

KW = dict(flops=0.3, stages=2, epochs_per_stage=1, final_epochs=1, batch_size=32,
          n_gradients=60, n_validation=60, progress=False)


@pytest.fixture(scope="module")
def model():
    return trained_cnn()


@pytest.fixture(scope="module")
def data():
    return small_data()


@pytest.mark.parametrize("method", ["mp", "falcon"])
def test_gradual_meets_budgets_keeps_masks_and_leaves_model(model, data, method):
    before = state(model)
    r = fp.gradual(model, data, method=method, eval_data=small_data(64, seed=1), **KW)
    assert same_state(model, before)
    assert r.flops_fraction <= 0.3
    phases = [row["phase"] for row in r.history]
    assert phases == ["prune", "finetune", "prune", "finetune", "final"]
    assert r.history[0]["flops_budget"] > r.history[2]["flops_budget"] == 0.3
    assert all("eval_accuracy" in row and "seconds" in row for row in r.history)
    masks = fp.masks_of(r.model)
    for name, m in (("c1", r.model.c1), ("c2", r.model.c2), ("fc", r.model.fc)):
        assert not m.weight[~masks[name]].any()  # fine-tuning kept pruned weights at zero
    kept, dense = fp.count_macs(fp.make_permanent(fp.api.clone_model(r.model)), data[0][:1])
    assert kept / dense <= 0.3 + 1e-12
    # fine-tuning repaired part of the damage of the last pruning step
    assert r.history[-1]["eval_loss"] < r.history[2]["eval_loss"]


def test_resume_after_interruption_gives_the_same_masks(model, data, tmp_path):
    full = fp.gradual(model, data, method="falcon", checkpoint_dir=tmp_path / "a", **KW)

    class Stop(Exception):
        pass

    def interrupt(row):
        if row["event"] == 3:  # after the second pruning step
            raise Stop

    with pytest.raises(Stop):
        fp.gradual(model, data, method="falcon", checkpoint_dir=tmp_path / "b",
                   callback=interrupt, **KW)
    resumed = fp.gradual(model, data, method="falcon", checkpoint_dir=tmp_path / "b",
                         resume=True, **KW)
    a, b = fp.masks_of(full.model), fp.masks_of(resumed.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.allclose(sa[k].float(), sb[k].float(), atol=1e-6) for k in sa)
    assert [r["event"] for r in resumed.history] == [1, 2, 3, 4, 5]


def test_checkpoint_guards(model, data, tmp_path):
    fp.gradual(model, data, method="mp", checkpoint_dir=tmp_path, **KW)
    with pytest.raises(FileExistsError, match="resume=True"):
        fp.gradual(model, data, method="mp", checkpoint_dir=tmp_path, **KW)
    with pytest.raises(ValueError, match="other settings"):
        fp.gradual(model, data, method="falcon", checkpoint_dir=tmp_path, resume=True, **KW)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        fp.gradual(model, data, method="mp", checkpoint_dir=tmp_path / "x", resume=True, **KW)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        fp.gradual(model, data, method="mp", resume=True, **KW)


def test_loader_input_and_custom_optimizer(model, data):
    loader = DataLoader(TensorDataset(*data), batch_size=48, shuffle=True)
    made = []

    def adam(params):
        made.append(1)
        return torch.optim.Adam(params, lr=1e-3)

    r = fp.gradual(model, loader, method="mp", optimizer=adam,
                   lr_scheduler=lambda opt, n: torch.optim.lr_scheduler.StepLR(opt, 1, 0.5),
                   **KW)
    assert made == [1] and r.flops_fraction <= 0.3
    lrs = [row["lr"] for row in r.history if "lr" in row]
    assert lrs == pytest.approx([1e-3, 5e-4, 2.5e-4])


@pytest.mark.parametrize("kw, exc, match", [
    ({"schedule": [0.8, 0.5]}, ValueError, "above the target"),
    ({"epochs_per_stage": 0, "final_epochs": 0}, ValueError, "no fine-tuning"),
    ({"epochs_per_stage": -1}, ValueError, "epochs_per_stage must be"),
    ({"flops": 1.2}, ValueError, "not a fraction"),
    ({"method": "falcon++"}, ValueError, "gradual step"),
    ({"lr": 0.0}, ValueError, "lr must be"),
])
def test_bad_arguments(model, data, kw, exc, match):
    before = state(model)
    with pytest.raises(exc, match=match):
        fp.gradual(model, data, **{"method": "mp", **KW, **kw})
    assert same_state(model, before)


def test_training_data_of_the_wrong_shape(model, data):
    before = state(model)
    x, y = data
    with pytest.raises(ValueError, match="cannot be trained"):
        fp.gradual(model, (x.reshape(len(x), -1), y), method="mp", **KW)
    with pytest.raises(ValueError, match="cannot be trained"):
        fp.gradual(model, (x, y + 10), method="mp", **KW)
    with pytest.raises(TypeError, match="train_data must be"):
        fp.gradual(model, "data", method="mp", **KW)
    assert same_state(model, before)


def test_batchnorm_statistics_are_re_estimated(data):
    torch.manual_seed(0)
    net = BatchNormCNN().eval()
    x = data[0]
    ds = TensorDataset(*data)
    recalibrate_batchnorm(net, ds, batches=100, batch_size=len(x), seed=0)
    with torch.no_grad():
        expected = net.c1(x).mean((0, 2, 3))
    assert torch.allclose(net.b1.running_mean, expected, atol=1e-5)
    assert not net.training  # the mode is restored


def test_gradual_with_batchnorm_model(data):
    torch.manual_seed(0)
    net = BatchNormCNN().eval()
    r = fp.gradual(net, data, method="falcon", **KW)
    assert r.flops_fraction <= 0.3
    assert torch.isfinite(r.model.b2.running_var).all()
