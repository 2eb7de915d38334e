"""falcon++: multi-stage one-shot pruning."""

import inspect
import json

import pytest
import torch
from helpers import same_state, state

import falcon_prune as fp
from falcon_prune.errors import ConfigError
from falcon_prune.runs import steps
from falcon_prune.settings import resolve, resolve_precisions


def record_steps(monkeypatch):
    """Record every step's arguments (by name, with the weights its space allowed when it
    started) and its outcome."""
    calls = []
    real = steps.solve
    sig = inspect.signature(real)

    def spy(*args, **kw):
        bound = sig.bind(*args, **kw)
        bound.apply_defaults()
        allowed = bound.arguments["space"].allowed
        arguments = {**bound.arguments, "allowed": None if allowed is None else allowed.clone()}
        outcome = real(*args, **kw)
        calls.append((arguments, outcome))
        return outcome

    monkeypatch.setattr("falcon_prune.runs.stages.solve", spy)
    return calls


def weights_of(model):
    plain = fp.make_permanent(fp.clone_model(model))
    return torch.cat([m.weight.detach().reshape(-1) for m in (plain.c1, plain.c2, plain.fc)])


def test_every_stage_meets_its_budgets_and_never_revives(cnn, data, monkeypatch,
                                                       bfloat16_hardware):
    calls = record_steps(monkeypatch)
    before = state(cnn)
    r = fp.prune(cnn, data, flops=0.3, nnz=0.5, method="falcon++",
                 schedule=fp.Schedule(stages=3, kind="linear"), n_gradients=80,
                 n_validation=80, progress=False)
    assert same_state(cnn, before)
    assert len(r.stages) == 3 and len(calls) == 3
    for row, (f_k, s_k) in zip(r.stages, [(0.7667, 0.8333), (0.5333, 0.6667), (0.3, 0.5)],
                               strict=True):
        assert row["flops_budget"] == pytest.approx(f_k, abs=1e-4)
        assert row["nnz_budget"] == pytest.approx(s_k, abs=1e-4)
        assert row["flops_fraction"] <= row["flops_budget"] + 1e-12
        assert row["nnz_fraction"] <= row["nnz_budget"] + 1e-12
        assert {"held_out_loss", "held_out_accuracy", "seconds"} <= set(row)
    for (_, prev), (args, cur) in zip(calls, calls[1:], strict=False):
        assert torch.equal(args["allowed"], prev.mask)  # restricted to the last support
        assert not (cur.mask & ~prev.mask).any()  # and nothing pruned came back
    assert r.flops_fraction <= 0.3 and r.nnz_fraction <= 0.5
    assert r.flops_fraction == pytest.approx(r.stages[-1]["flops_fraction"])


def test_incoming_zeros_stay_pruned_and_revive_brings_weights_back(cnn, data):
    first = fp.prune(cnn, data, flops=0.6, method="mp", progress=False)
    zero = weights_of(first.model) == 0
    kw = dict(flops=0.5, method="falcon++", stages=2, n_gradients=60, progress=False)
    kept = weights_of(fp.prune(first.model, data, **kw).model) != 0
    assert not (kept & zero).any()
    revived = fp.prune(first.model, data, revive=True, **kw)
    assert (weights_of(revived.model)[zero] != 0).any()  # a pruned weight came back
    assert revived.flops_fraction <= 0.5


def test_trajectory_files(cnn, data, tmp_path):
    r = fp.prune(cnn, data, flops=0.4, method="falcon++", stages=2, n_gradients=60,
                 progress=False)
    lines = r.write_trajectory(tmp_path / "t.csv").read_text().splitlines()
    assert lines[0].startswith("stage,flops_budget") and len(lines) == 3
    rows = json.loads(r.write_trajectory(tmp_path / "t.json").read_text())
    assert [row["stage"] for row in rows] == [1, 2]
    assert r.to_dict()["stages"] == r.stages
    with pytest.raises(ConfigError, match=".csv or a .json"):
        r.write_trajectory(tmp_path / "t.txt")


def test_single_stage_methods_have_no_trajectory(cnn, data):
    assert fp.prune(cnn, data, flops=0.4, method="mp", progress=False).stages == []


def test_bad_schedule_is_refused_and_model_unchanged(cnn, data):
    before = state(cnn)
    with pytest.raises(ConfigError, match="above the target"):
        fp.prune(cnn, data, flops=0.3, method="falcon++", schedule=[0.8, 0.5], progress=False)
    with pytest.raises(ConfigError, match="stages must be"):
        fp.prune(cnn, data, flops=0.3, method="falcon++", stages=0, progress=False)
    with pytest.raises(ConfigError, match="disagrees"):
        fp.prune(cnn, data, flops=0.3, method="falcon++", schedule=fp.Schedule(4), stages=3,
                 progress=False)
    assert same_state(cnn, before)


@pytest.mark.parametrize("resample", [False, True])
def test_resample_gives_each_stage_new_gradient_samples(cnn, data, monkeypatch, resample):
    calls = record_steps(monkeypatch)
    fp.prune(cnn, data, flops=0.4, method="falcon++", schedule=fp.Schedule(3), n_gradients=60,
             samples_per_gradient=1, n_validation=60, resample=resample, progress=False)
    fits = [args["fit"].batch[0] for args, _ in calls]
    helds = [args["held"].batch[0] for args, _ in calls]
    assert len(fits) == 3 and all(len(f) == 60 for f in fits)
    assert all(torch.equal(h, helds[0]) for h in helds)  # one held-out set for every stage
    if not resample:
        assert all(torch.equal(f, fits[0]) for f in fits)
        return
    # 240 samples: 60 held out, a pool of 180 = three disjoint blocks of 60
    pool = torch.cat(fits).flatten(1)
    assert len(torch.unique(pool, dim=0)) == 180
    held = helds[0].flatten(1)
    assert not (held[:, None] == pool[None]).all(2).any()


def test_stage_rows_report_the_held_out_loss_of_the_stage_result(cnn, data):
    """The last stage's held-out loss and accuracy equal a fresh evaluation of the result
    on the held-out samples (with sampling='first' they are the data's last 80)."""
    x, y = data
    r = fp.prune(cnn, data, flops=0.4, method="falcon++", stages=2, n_gradients=60,
                 n_validation=80, sampling="first", held_out_precision="model",
                 progress=False)  # float32 scores, as fp.evaluate computes them
    fresh = fp.evaluate(r.model, (x[160:], y[160:]))
    assert r.stages[-1]["held_out_loss"] == pytest.approx(fresh.loss, rel=1e-5)
    assert r.stages[-1]["held_out_accuracy"] == pytest.approx(fresh.metric)


@pytest.mark.parametrize(("kw", "expected"), [
    ({"n_gradients": 50}, 2),  # falcon++'s default: mini-batch gradients of 2 samples
    ({"n_gradients": 150}, 1),  # 240 samples cannot give 150 x 2: the documented fallback
    ({"n_gradients": 50, "samples_per_gradient": 3}, 3),  # what the caller asks
])
def test_falcon_pp_samples_per_gradient_default(cnn, data, monkeypatch, kw, expected):
    calls = record_steps(monkeypatch)
    r = fp.prune(cnn, data, flops=0.5, method="falcon++", stages=1, progress=False, **kw)
    assert r.config.samples_per_gradient == expected
    assert len(calls[0][0]["fit"]) == kw["n_gradients"] * expected


def test_falcon_pp_small_batch_iterable_falls_back_to_one_sample_per_gradient(cnn, data):
    """Data of unknown length (a generator of batches) too small for 2 samples per
    gradient: the same fallback as for data whose length is known."""
    x, y = data
    batches = ((x[i : i + 40], y[i : i + 40]) for i in range(0, len(x), 40))
    r = fp.prune(cnn, batches, flops=0.5, method="falcon++", stages=1, n_gradients=150,
                 progress=False)
    assert r.config.samples_per_gradient == 1 and r.config.sampling == "first"
    assert r.flops_fraction <= 0.5


def test_multistage_options_change_one_choice_and_keep_the_others(cnn, data, monkeypatch):
    opts = fp.multistage_options(ridges=(1e-2,))
    default = fp.defaults("falcon++").solver
    assert opts == default.replace(ridges=(1e-2,)) and opts.max_iter == 0
    assert fp.SolverOptions().max_iter != opts.max_iter
    with pytest.raises(TypeError):
        fp.multistage_options(ridge=1e-2)  # not a SolverOptions field
    r = fp.prune(cnn, data, flops=0.5, method="falcon++", stages=2, n_gradients=60,
                 solver=opts, progress=False)
    assert r.config.solver.ridges == (1e-2,) and r.config.solver.saliencies == ("magnitude",)


# -- effort presets ------------------------------------------------------------------------
def test_effort_presets_are_named_defaults(bfloat16_hardware):
    fast = fp.defaults("falcon++", effort="fast")
    assert fast.effort == "fast" and fast.schedule.stages == 6
    assert (fast.n_gradients, fast.samples_per_gradient) == (500, 2)
    assert fp.defaults("falcon++").effort == "default" == fp.defaults("falcon++",
                                                                       effort="default").effort
    assert set(fp.EFFORTS) == {"default", "best", "fast"}
    default = fp.defaults("falcon++")
    assert (default.n_gradients, default.samples_per_gradient, default.n_validation) == (
        1000, 2, 1000)
    assert default.solver.saliencies == ("magnitude",) and default.schedule.stages == 8
    assert default.gradient_precision == default.held_out_precision == "auto"
    best = fp.defaults("falcon++", effort="best")
    assert (best.n_gradients, best.samples_per_gradient, best.n_validation) == (1000, 2, 500)
    assert best.solver.saliencies == ("obs",) and best.schedule.stages == 12
    assert best.gradient_precision == best.held_out_precision == "model"
    assert fast.solver.saliencies == ("magnitude",) and fast.n_validation == 500
    assert fast.gradient_precision == "auto"
    cfg, _ = resolve("falcon++", None, {})  # 'auto' stays until the model's dtype is known
    assert cfg.gradient_precision == "auto"
    native = "bfloat16" if bfloat16_hardware else "model"
    assert resolve_precisions(cfg, torch.float32).held_out_precision == native
    assert resolve_precisions(cfg, torch.bfloat16).gradient_precision == native
    f64 = resolve_precisions(cfg, torch.float64)  # a float64 model is pruned in float64
    assert f64.gradient_precision == f64.held_out_precision == "model"
    explicit = resolve_precisions(cfg.replace(gradient_precision="model"), torch.float32)
    assert explicit.gradient_precision == "model"
    # structure='channels' keeps its own tuned defaults (float32, 500 held-out samples)
    channels = fp.defaults("falcon++", structure="channels")
    assert channels.n_validation == 500 and channels.gradient_precision == "model"
    assert channels.held_out_precision == "model" and channels.schedule.stages == 4


def test_effort_fast_prunes_with_its_preset_and_settings_override_it(cnn, data):
    r = fp.prune(cnn, data, flops=0.4, method="falcon++", effort="fast", n_gradients=60,
                 n_validation=60, progress=False)
    assert r.config.effort == "fast" and r.config.schedule.stages == 6
    assert r.config.samples_per_gradient == 2 and r.config.n_gradients == 60
    assert r.flops_fraction <= 0.4 and len(r.stages) <= 6
    assert r.to_dict()["config"]["effort"] == "fast"


@pytest.mark.parametrize("kw, match", [
    ({"method": "falcon", "effort": "fast"}, "does not use effort"),
    ({"method": "falcon++", "effort": "quick"}, "effort must be one of default, best, fast"),
    ({"method": "falcon++", "effort": "fast", "structure": "channels"},
     "preset of falcon\\+\\+ with structure='weights'"),
    ({"method": "falcon++", "effort": "default", "config": fp.defaults("falcon++", effort="fast")},
     "give the effort in one place"),
])
def test_bad_effort_is_refused(cnn, data, kw, match):
    with pytest.raises(ConfigError, match=match):
        fp.prune(cnn, data, flops=0.4, progress=False, **kw)


def test_stage_samples_are_views_unless_they_wrap_around():
    """Stage blocks of contiguous rows are views of the drawn samples (no copy of the
    images per stage); a block that wraps past the pool's end is a copy of the right rows."""
    from falcon_prune.data.batches import Samples
    from falcon_prune.runs.setup import Draw

    x = torch.arange(10.0)[:, None].repeat(1, 3)
    d = Draw(Samples((x, torch.arange(10))), pool=7, n_fit=3, bn=None)
    for stage, resample, rows in [(1, False, [0, 1, 2]), (4, False, [0, 1, 2]),
                                  (2, True, [3, 4, 5]), (3, True, [6, 0, 1])]:
        fx, fy = d.fit(stage, resample).batch
        assert fy.tolist() == rows
        assert (fx.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()) == (
            rows == list(range(rows[0], rows[0] + 3)))
