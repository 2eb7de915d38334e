"""Gradual pruning with fine-tuning, checkpoints and resume."""

import sys
import warnings

import pytest
import torch
from helpers import BatchNormCNN, same_state, small_data, state
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    SequentialSampler,
    SubsetRandomSampler,
    TensorDataset,
)

import falcon_prune as fp
from falcon_prune.errors import (
    CheckpointError,
    ConfigError,
    ConfigTypeError,
    DataError,
    DataTypeError,
    MissingFileError,
    OutputExistsError,
)
from falcon_prune.runs.checkpoints import CHECKPOINT_NAME
from falcon_prune.runs.training import as_feed, recalibrate_on

KW = dict(flops=0.3, stages=2, epochs_per_stage=1, final_epochs=1, batch_size=32,
          progress=False)
STEP = dict(n_gradients=60, n_validation=60)  # what falcon's steps use (mp uses neither)


@pytest.fixture
def model(cnn):
    return cnn


@pytest.mark.parametrize("method", ["mp", "falcon"])
def test_gradual_meets_budgets_keeps_masks_and_leaves_model(model, data, method):
    before = state(model)
    step = STEP if method == "falcon" else {}
    r = fp.gradual(model, data, method=method, eval_data=small_data(64, seed=1), **KW, **step)
    assert same_state(model, before)
    assert r.flops_fraction <= 0.3
    phases = [row["phase"] for row in r.history]
    assert phases == ["prune", "finetune", "prune", "finetune", "final"]
    assert r.history[0]["flops_budget"] > r.history[2]["flops_budget"] == 0.3
    assert all("eval_accuracy" in row and "seconds" in row for row in r.history)
    masks = fp.masks_of(r.model)
    for name in ("c1", "c2", "fc"):  # fine-tuning kept pruned weights at zero
        assert not getattr(r.model, name).weight[~masks[f"{name}.weight"]].any()
    kept, dense = fp.count_macs(r.model, data[0][:1])
    assert kept / dense <= 0.3 + 1e-12
    # fine-tuning repaired part of the damage of the last pruning step
    assert r.history[-1]["eval_loss"] < r.history[2]["eval_loss"]


def test_resume_after_interruption_gives_the_same_masks(model, data, tmp_path):
    full = fp.gradual(model, data, method="falcon", checkpoint_dir=tmp_path / "a", **KW, **STEP)

    class Stop(Exception):
        pass

    def interrupt(row):
        if row["event"] == 3:  # after the second pruning step
            raise Stop

    with pytest.raises(Stop):
        fp.gradual(model, data, method="falcon", checkpoint_dir=tmp_path / "b",
                   callback=interrupt, **KW, **STEP)
    torch.manual_seed(999)  # the caller's RNG state must not matter to a resumed run
    resumed = fp.gradual(model, data, method="falcon", checkpoint_dir=tmp_path / "b",
                         resume=True, **KW, **STEP)
    a, b = fp.masks_of(full.model), fp.masks_of(resumed.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.allclose(sa[k].float(), sb[k].float(), atol=1e-6) for k in sa)
    assert [r["event"] for r in resumed.history] == [1, 2, 3, 4, 5]


def test_checkpoint_guards(model, data, tmp_path):
    fp.gradual(model, data, method="mp", checkpoint_dir=tmp_path, **KW)
    with pytest.raises(OutputExistsError, match="resume=True"):
        fp.gradual(model, data, method="mp", checkpoint_dir=tmp_path, **KW)
    with pytest.raises(CheckpointError, match="other settings"):
        fp.gradual(model, data, method="falcon", checkpoint_dir=tmp_path, resume=True, **KW,
                   **STEP)
    with pytest.raises(MissingFileError, match="no checkpoint"):
        fp.gradual(model, data, method="mp", checkpoint_dir=tmp_path / "x", resume=True, **KW)
    with pytest.raises(ConfigError, match="checkpoint_dir"):
        fp.gradual(model, data, method="mp", resume=True, **KW)


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "not a run"])
def test_a_damaged_checkpoint_is_refused_on_resume(model, data, tmp_path, damage):
    fp.gradual(model, data, method="mp", checkpoint_dir=tmp_path, **KW)
    path = tmp_path / CHECKPOINT_NAME
    raw = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": raw[: len(raw) // 2],
                      "garbage": b"not a checkpoint at all"}.get(damage, b""))
    if damage == "not a run":
        torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="gradual" if damage == "not a run" else "corrupt"):
        fp.gradual(model, data, method="mp", checkpoint_dir=tmp_path, resume=True, **KW)


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
    ({"schedule": [0.8, 0.5]}, ConfigError, "above the target"),
    ({"schedule": [0.6, 0.3], "stages": 3}, ConfigError, "disagrees"),
    ({"epochs_per_stage": 0, "final_epochs": 0}, ConfigError, "no fine-tuning"),
    ({"epochs_per_stage": -1}, ConfigError, "epochs_per_stage must be"),
    ({"flops": 1.2}, ConfigError, "not a fraction"),
    ({"method": "falcon++"}, ConfigError, "single-stage method"),
    ({"lr": 0.0}, ConfigError, "lr has a bad value"),
    ({"method": "falcon", "n_validation": -1}, ConfigError, "n_validation must be an integer"),
    ({"method": "falcon", "n_validation": 10.5}, ConfigError, "n_validation must be an int"),
    ({"method": "falcon", "n_validation": True}, ConfigError, "n_validation must be an int"),
    ({"n_gradients": 60}, ConfigError, "does not use n_gradients"),
    ({"recalibrate_bn": 10}, ConfigError, "bn_batches"),
    ({"device": "tpu9"}, ConfigError, "not a torch device"),
])
def test_bad_arguments(model, data, kw, exc, match):
    before = state(model)
    with pytest.raises(exc, match=match):
        fp.gradual(model, data, **{"method": "mp", **KW, **kw})
    assert same_state(model, before)


def test_explicit_schedule_sets_the_number_of_stages(model, data):
    kw = {k: v for k, v in KW.items() if k != "stages"}  # stages left at its default
    r = fp.gradual(model, data, method="mp", schedule=[0.6, 0.45, 0.3], **kw)
    assert [row["flops_budget"] for row in r.history if row["phase"] == "prune"] == \
        [0.6, 0.45, 0.3]


def test_training_data_of_the_wrong_shape(model, data):
    before = state(model)
    x, y = data
    with pytest.raises(DataError, match="could not run on the data"):
        fp.gradual(model, (x.reshape(len(x), -1), y), method="mp", **KW)
    with pytest.raises(DataError, match="labels must be class indices in \\[0, 3\\]"):
        fp.gradual(model, (x, y + 10), method="mp", **KW)
    with pytest.raises(DataTypeError, match="train_data must be"):
        fp.gradual(model, "data", method="mp", **KW)
    assert same_state(model, before)


def test_batchnorm_statistics_are_re_estimated(data):
    torch.manual_seed(0)
    net = BatchNormCNN().eval()
    x = data[0]
    feed = as_feed(TensorDataset(*data), len(x))
    recalibrate_on(net, feed, batches=100, seed=0, task=fp.tasks.classification())
    with torch.no_grad():
        expected = net.c1(x).mean((0, 2, 3))
    assert torch.allclose(net.b1.running_mean, expected, atol=1e-5)
    assert not net.training  # the mode is restored


def test_gradual_with_batchnorm_model(data):
    torch.manual_seed(0)
    net = BatchNormCNN().eval()
    r = fp.gradual(net, data, method="falcon", **KW, **STEP)
    assert r.flops_fraction <= 0.3
    assert torch.isfinite(r.model.b2.running_var).all()


class FlatDataset(Dataset):
    """Items (x flattened to (64,), y): only a collate_fn that reshapes makes them trainable."""

    def __init__(self, x, y):
        self.x, self.y = x.reshape(len(x), -1), y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def test_loader_collate_fn_is_used_and_its_sampler_replaced(model, data):
    calls = []

    def unflatten(items):
        calls.append(len(items))
        return torch.stack([x for x, _ in items]).reshape(-1, 1, 8, 8), \
            torch.stack([y for _, y in items])

    loader = DataLoader(FlatDataset(*data), batch_size=32, shuffle=False, collate_fn=unflatten)
    kw = {**KW, "batch_size": 7}  # the loader's batch size wins
    r = fp.gradual(model, loader, method="falcon", **kw, **STEP)
    assert 32 in calls and 120 in calls  # training batches; the 120 pruning-step samples
    # same seeded order as for the tensors themselves: identical masks and weights
    ref = fp.gradual(model, data, method="falcon", **KW, **STEP)
    a, b = fp.masks_of(r.model), fp.masks_of(ref.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = r.model.state_dict(), ref.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_loader_options_are_kept_and_custom_samplers_warned(data):
    ds = TensorDataset(*data)
    loader = DataLoader(ds, batch_size=50, shuffle=True, num_workers=2, drop_last=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a plain RandomSampler is replaced silently
        feed = as_feed(loader, 128)
    epoch = feed.epoch(seed=0, epoch=1)
    assert (feed.batch_size, epoch.num_workers, epoch.drop_last) == (50, 2, True)
    assert [len(b[0]) for b in feed.epoch(0, 1)] == [50] * 4  # drop_last: 240 = 4 x 50 + 40
    subset = DataLoader(ds, batch_size=50, sampler=SubsetRandomSampler(range(10)))
    with pytest.warns(UserWarning, match="custom sampler \\(SubsetRandomSampler\\).*seeded"):
        assert len(as_feed(subset, 128).dataset) == 240
    custom = DataLoader(ds, batch_sampler=[[0, 1], [2, 3]])
    with pytest.warns(UserWarning, match="custom batch_sampler.*batches of 64"):
        assert as_feed(custom, 64).batch_size == 64
    plain = DataLoader(ds, batch_sampler=BatchSampler(SequentialSampler(ds), 16, False))
    assert as_feed(plain, 64).batch_size == 16
    with pytest.raises(ConfigError, match="batch_size=None"):
        as_feed(DataLoader(ds, batch_size=None), 64)


def test_seeded_order_depends_only_on_seed_and_epoch(data):
    feed = as_feed(DataLoader(TensorDataset(*data), batch_size=60, shuffle=True), 128)
    first = [y for _, y in feed.epoch(3, 2)]
    assert all(torch.equal(a, b) for a, b in zip(first, [y for _, y in feed.epoch(3, 2)],
                                                   strict=True))
    other = torch.cat([y for _, y in feed.epoch(3, 1)])
    assert not torch.equal(torch.cat(first), other)


def test_checkpoint_config_records_every_setting(model, data, tmp_path):
    fp.gradual(model, data, method="mp", checkpoint_dir=tmp_path, **KW)
    config = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=False)["config"]
    assert {"lr", "momentum", "weight_decay", "step", "bn_batches", "schedule", "levels",
            "n_train", "optimizer", "lr_scheduler", "drop_last", "collate_fn"} <= config.keys()
    assert {"task", "seed", "min_density", "solver", "n_validation"} <= config["step"].keys()
    assert config["schedule"]["kind"] == "cubic" and config["lr_scheduler"] == "cosine"
    with pytest.raises(CheckpointError, match=r"other settings \{'lr': \(0\.01, 0\.02\)\}"):
        fp.gradual(model, data, method="mp", checkpoint_dir=tmp_path, resume=True,
                   **{**KW, "lr": 0.02})
    with pytest.raises(CheckpointError, match="'step'"):
        fp.gradual(model, data, method="mp", checkpoint_dir=tmp_path, resume=True,
                   **{**KW, "min_density": 0.1})
    with pytest.raises(CheckpointError, match="'optimizer': \\('sgd', 'custom'\\)"):
        fp.gradual(model, data, method="mp", checkpoint_dir=tmp_path, resume=True,
                   optimizer=lambda p: torch.optim.SGD(p, lr=0.01), **KW)
    # the same settings resume (nothing left to do)
    r = fp.gradual(model, data, method="mp", checkpoint_dir=tmp_path, resume=True, **KW)
    assert len(r.history) == 5


class Halving:
    """An LR schedule without state_dict/load_state_dict."""

    def __init__(self, opt):
        self.opt = opt

    def step(self):
        for g in self.opt.param_groups:
            g["lr"] /= 2


def test_scheduler_without_state_cannot_be_checkpointed(model, data, tmp_path):
    with pytest.raises(ConfigTypeError, match="must provide state_dict and load_state_dict"):
        fp.gradual(model, data, method="mp", lr_scheduler=lambda o, n: Halving(o),
                   checkpoint_dir=tmp_path, **KW)
    assert not (tmp_path / CHECKPOINT_NAME).exists()  # refused before any work
    r = fp.gradual(model, data, method="mp", lr_scheduler=lambda o, n: Halving(o), **KW)
    assert [row["lr"] for row in r.history if "lr" in row] == pytest.approx([0.01, 5e-3, 2.5e-3])
    with pytest.raises(ConfigTypeError, match="without step"):
        fp.gradual(model, data, method="mp", lr_scheduler=lambda o, n: object(), **KW)


def test_progress_bar_shows_stage_budgets_and_loss(model, data, monkeypatch):
    postfixes = []

    class Bar:
        def __init__(self, *args, **kw):
            pass

        def update(self, n):
            pass

        def set_postfix(self, post):
            postfixes.append(dict(post))

        def close(self):
            pass

    monkeypatch.setattr(sys.modules["falcon_prune.runs.gradual"], "tqdm", Bar)
    r = fp.gradual(model, data, method="mp", nnz=0.5, eval_data=small_data(64, seed=1), **KW)
    assert len(postfixes) == len(r.history) == 5
    first, second, last = postfixes[0], postfixes[1], postfixes[-1]
    assert first["stage"] == "1/2" and first["loss"] == "nan"  # no epoch trained yet
    assert first["flops_budget"] == f"{r.history[0]['flops_budget']:.3f}"
    assert first["nnz_budget"] == f"{r.history[0]['nnz_budget']:.3f}"
    assert second["loss"] == f"{r.history[1]['train_loss']:.3g}"
    assert last == {"stage": "2/2", "flops_budget": "0.300", "nnz_budget": "0.500",
                    "loss": f"{r.history[-1]['train_loss']:.3g}",
                    "eval_loss": f"{r.history[-1]['eval_loss']:.3g}"}


def test_device_argument_places_the_copy(model, data, monkeypatch):
    r = fp.gradual(model, data, method="mp", device=torch.device("cpu"), **KW)
    assert all(p.device.type == "cpu" for p in r.model.parameters())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # on any machine
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        fp.gradual(model, data, method="mp", device="cuda", **KW)


def test_the_callers_rng_state_is_left_untouched(model, data):
    torch.manual_seed(7)
    before = torch.get_rng_state()
    fp.gradual(model, data, method="falcon", **KW, **STEP)
    assert torch.equal(torch.get_rng_state(), before)


def test_result_config_and_recount(model, data):
    r = fp.gradual(model, data, method="falcon", **KW, **STEP)
    assert r.config.step.n_gradients == 60 and r.config.schedule.stages == 2
    assert r.config.to_dict()["step"]["task"] == "classification"
    kept, dense = fp.count_macs(r.model, data[0][:1])
    assert r.flops_fraction == pytest.approx(kept / dense)


def test_gradual_reports_and_checks_its_flops_on_the_scale_flops_of_names(model, data):
    """flops_of='model': the budget, the check and the report are fractions of the whole
    network's MACs (here the excluded fc's count as kept), not of the prunable ones."""
    r = fp.gradual(model, data, method="mp", flops_of="model", exclude=["fc"], **KW)
    kept, dense = fp.count_macs(r.model, data[0][:1])
    assert r.flops_fraction == pytest.approx(kept / dense, rel=1e-9)
    assert r.flops_fraction <= 0.3 + 1e-12
