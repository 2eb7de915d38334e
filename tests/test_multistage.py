"""falcon++: multi-stage one-shot pruning."""

import json

import pytest
import torch
from helpers import same_state, small_data, state, trained_cnn

import falcon_prune as fp
from falcon_prune import api


@pytest.fixture(scope="module")
def model():
    return trained_cnn()


@pytest.fixture(scope="module")
def data():
    return small_data()


def test_every_stage_meets_its_budgets_and_never_revives(model, data, monkeypatch):
    seen = []
    real = api.solve_step

    def spy(*args, **kw):
        out = real(*args, **kw)
        allowed = args[8] if len(args) > 8 else kw.get("allowed")
        seen.append((None if allowed is None else allowed.clone(), out[2].clone()))
        return out

    monkeypatch.setattr(api, "solve_step", spy)
    before = state(model)
    sched = fp.Schedule(stages=3, kind="linear")
    r = fp.prune(model, data, flops=0.3, nnz=0.5, method="falcon++", schedule=sched,
                 n_gradients=80, n_validation=80, progress=False)
    assert same_state(model, before)
    assert len(r.stages) == 3 and len(seen) == 3
    for row, (f_k, s_k) in zip(r.stages, [(0.7667, 0.8333), (0.5333, 0.6667), (0.3, 0.5)],
                               strict=True):
        assert row["flops_budget"] == pytest.approx(f_k, abs=1e-4)
        assert row["nnz_budget"] == pytest.approx(s_k, abs=1e-4)
        assert row["flops_fraction"] <= row["flops_budget"] + 1e-12
        assert row["nnz_fraction"] <= row["nnz_budget"] + 1e-12
        assert {"held_out_loss", "held_out_accuracy", "seconds"} <= set(row)
    for (_, prev), (allowed, cur) in zip(seen, seen[1:], strict=False):
        assert torch.equal(allowed, prev)  # the stage was restricted to the previous support
        assert not (cur & ~prev).any()  # and nothing pruned came back
    assert r.flops_fraction <= 0.3 and r.nnz_fraction <= 0.5
    assert r.flops_fraction == pytest.approx(r.stages[-1]["flops_fraction"])


def test_incoming_zeros_stay_pruned_unless_revive(model, data):
    first = fp.prune(model, data, flops=0.6, method="mp", progress=False)
    zero = torch.cat([m.weight.detach().reshape(-1) == 0
                      for m in (first.model.c1, first.model.c2, first.model.fc)])
    r = fp.prune(first.model, data, flops=0.3, method="falcon++", stages=2, n_gradients=60,
                 progress=False)
    kept = torch.cat([m.weight.detach().reshape(-1) != 0
                      for m in (r.model.c1, r.model.c2, r.model.fc)])
    assert not (kept & zero).any()
    r2 = fp.prune(first.model, data, flops=0.3, method="falcon++", stages=2, n_gradients=60,
                  revive=True, progress=False)
    assert r2.flops_fraction <= 0.3


def test_trajectory_files(model, data, tmp_path):
    r = fp.prune(model, data, flops=0.4, method="falcon++", stages=2, n_gradients=60,
                 progress=False)
    csv_path = r.write_trajectory(tmp_path / "t.csv")
    lines = csv_path.read_text().splitlines()
    assert lines[0].startswith("stage,flops_budget") and len(lines) == 3
    rows = json.loads(r.write_trajectory(tmp_path / "t.json").read_text())
    assert [row["stage"] for row in rows] == [1, 2]
    assert r.to_dict()["stages"] == r.stages
    with pytest.raises(ValueError, match=".csv or a .json"):
        r.write_trajectory(tmp_path / "t.txt")


def test_single_stage_methods_have_no_trajectory(model, data):
    r = fp.prune(model, data, flops=0.4, method="mp", progress=False)
    assert r.stages == []


def test_bad_schedule_is_refused_and_model_unchanged(model, data):
    before = state(model)
    with pytest.raises(ValueError, match="above the target"):
        fp.prune(model, data, flops=0.3, method="falcon++", schedule=[0.8, 0.5],
                 progress=False)
    with pytest.raises(ValueError, match="stages must be"):
        fp.prune(model, data, flops=0.3, method="falcon++", stages=0, progress=False)
    assert same_state(model, before)


@pytest.mark.parametrize("resample", [False, True])
def test_resample_gives_each_stage_new_gradient_samples(model, data, monkeypatch, resample):
    fits, helds = [], []
    real = api.solve_step

    def spy(*args, **kw):
        fits.append(args[5].x.clone())
        helds.append(args[6].x.clone())
        return real(*args, **kw)

    monkeypatch.setattr(api, "solve_step", spy)
    fp.prune(model, data, flops=0.4, method="falcon++", schedule=fp.Schedule(3),
             n_gradients=60, samples_per_gradient=1, n_validation=60, resample=resample,
             progress=False)
    assert len(fits) == 3 and all(len(f) == 60 for f in fits)
    assert all(torch.equal(h, helds[0]) for h in helds)  # one held-out set for every stage
    if not resample:
        assert all(torch.equal(f, fits[0]) for f in fits)
        return
    # 240 samples: 60 held out, a pool of 180 = three disjoint blocks of 60
    assert not any(torch.equal(fits[i], fits[j]) for i in range(3) for j in range(i))
    pool = torch.cat(fits)
    assert len(torch.unique(pool.reshape(len(pool), -1), dim=0)) == 180
    assert not any(bool((h == pool).flatten(1).all(1).any()) for h in helds[0][:, None])


def test_resample_belongs_to_falcon_plus_plus(model, data):
    with pytest.raises(ValueError, match="single-stage"):
        fp.prune(model, data, flops=0.4, method="falcon", resample=True, progress=False)


def test_stage_rows_reuse_the_solvers_held_out_measurement(model, data, monkeypatch):
    """The trajectory's held-out loss and accuracy come from the solver's evaluation of the
    chosen candidate; they equal a fresh pass over the held-out samples."""
    real = api.stage_record
    checked = []

    def spy(*args, known=None, **kw):
        if known is None and len(args) > 8:
            known, args = args[8], args[:8]
        fresh = real(*args, **kw)
        assert known is not None  # falcon's choice came with its held-out measurement
        assert known[0] == pytest.approx(fresh["held_out_loss"], rel=1e-5)
        assert known[1] == pytest.approx(fresh["held_out_accuracy"])
        checked.append(known)
        return real(*args, known=known, **kw)

    monkeypatch.setattr(api, "stage_record", spy)
    r = fp.prune(model, data, flops=0.4, method="falcon++", stages=2, n_gradients=60,
                 n_validation=80, progress=False)
    assert len(checked) == 2
    assert [row["held_out_loss"] for row in r.stages] == [k[0] for k in checked]


@pytest.mark.parametrize(("kw", "expected"), [
    ({"n_gradients": 50}, 2),  # falcon++'s default: mini-batch gradients of 2 samples
    ({"n_gradients": 150}, 1),  # 240 samples cannot give 150 x 2: the documented fallback
    ({"n_gradients": 50, "samples_per_gradient": 3}, 3),  # what the caller asks
])
def test_falcon_pp_samples_per_gradient_default(model, data, monkeypatch, kw, expected):
    seen = []
    real = api.gradient_store

    def spy(model, cm, fit, n_gradients, samples_per_gradient, *args, **kwargs):
        seen.append((len(fit), n_gradients, samples_per_gradient))
        return real(model, cm, fit, n_gradients, samples_per_gradient, *args, **kwargs)

    monkeypatch.setattr(api, "gradient_store", spy)
    r = fp.prune(model, data, flops=0.5, method="falcon++", stages=1, progress=False, **kw)
    n = kw["n_gradients"]
    assert seen == [(n * expected, n, expected)]
    assert r.details["samples_per_gradient"] == expected


def test_single_stage_default_is_one_sample_per_gradient(model, data, monkeypatch):
    seen = []
    real = api.gradient_store

    def spy(model, cm, fit, n_gradients, samples_per_gradient, *args, **kwargs):
        seen.append(samples_per_gradient)
        return real(model, cm, fit, n_gradients, samples_per_gradient, *args, **kwargs)

    monkeypatch.setattr(api, "gradient_store", spy)
    fp.prune(model, data, flops=0.5, method="falcon", n_gradients=50, progress=False)
    assert seen == [1]


def test_falcon_pp_small_batch_iterable_falls_back_to_one_sample_per_gradient(model, data):
    """Data of unknown length (a generator of batches) too small for the default 2 samples
    per gradient: the same fallback as for data whose length is known."""
    x, y = data
    batches = ((x[i : i + 40], y[i : i + 40]) for i in range(0, len(x), 40))
    r = fp.prune(model, batches, flops=0.5, method="falcon++", stages=1, n_gradients=150,
                 progress=False)
    assert r.details["samples_per_gradient"] == 1
    assert r.flops_fraction <= 0.5


def test_multistage_options_change_one_choice_and_keep_the_others(model, data, monkeypatch):
    opts = fp.multistage_options(ridges=(1e-2,), progress=False)
    for k in api.MULTISTAGE_OPTIONS:
        if k != "ridges":
            assert getattr(opts, k) == api.MULTISTAGE_DEFAULTS[k]
    assert opts.ridges == (1e-2,) and fp.SolverOptions().max_iter != opts.max_iter
    with pytest.raises(TypeError):
        fp.multistage_options(ridge=1e-2)  # not a SolverOptions field
    used = []
    real = api.solve_step

    def spy(*args, **kw):
        used.append(args[7].options)
        return real(*args, **kw)

    monkeypatch.setattr(api, "solve_step", spy)
    fp.prune(model, data, flops=0.5, method="falcon++", stages=2, n_gradients=60,
             progress=False)
    default = used[-1]
    assert all(getattr(default, k) == api.MULTISTAGE_DEFAULTS[k] for k in api.MULTISTAGE_OPTIONS)
