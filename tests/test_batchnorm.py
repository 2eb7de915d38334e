"""Re-estimating BatchNorm statistics: the function itself and prune's recalibrate_bn."""

import pytest
import torch
from helpers import BatchNormCNN, SmallCNN, same_state, state
from torch import nn

import falcon_prune as fp
from falcon_prune.analysis.batchnorm import recalibrate_batchnorm
from falcon_prune.errors import ConfigError, DataError


def test_statistics_are_the_average_over_the_batches_and_modes_are_restored():
    net = nn.Sequential(nn.Dropout(0.5), nn.BatchNorm1d(5, momentum=0.3)).eval()
    x = torch.randn(200, 5) * 3 + 1
    seen = recalibrate_batchnorm(net, x, batch_size=64)  # 4 batches of 50
    assert seen == 200
    bn = net[1]
    # dropout stayed off (eval mode), so the mean is that of x itself
    assert torch.allclose(bn.running_mean, x.mean(0), atol=1e-5)
    # momentum None: the plain average of the batches' (unbiased) variances
    want = torch.stack([c.var(0) for c in x.split(50)]).mean(0)
    assert torch.allclose(bn.running_var, want, atol=1e-4)
    assert bn.momentum == 0.3 and not net.training and not bn.training


def test_iterable_of_dict_batches_and_a_custom_call():
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, features, scale):
            return self.bn(features * scale)

    net = Keyword().train()
    x = torch.randn(60, 3) + 2
    batches = [{"features": c, "scale": torch.full((len(c), 1), 2.0)} for c in x.split(20)]
    assert recalibrate_batchnorm(net, batches) == 60
    assert torch.allclose(net.bn.running_mean, 2 * x.mean(0), atol=1e-5)
    assert net.training  # the mode it came in with

    calls = []

    def call(model, inputs):
        calls.append(len(inputs["features"]))
        return model(inputs["features"], 1.0)

    recalibrate_batchnorm(net, {"features": x}, batch_size=25, call=call)
    assert calls == [20, 20, 20]  # near-equal batches of at most 25
    assert torch.allclose(net.bn.running_mean, x.mean(0), atol=1e-5)


def test_no_batchnorm_and_no_batches():
    net = SmallCNN()
    before = state(net)
    assert recalibrate_batchnorm(net, torch.randn(4, 1, 8, 8)) == 0
    assert same_state(net, before)
    bn_net = BatchNormCNN().train()
    bn_net(torch.randn(16, 1, 8, 8) * 2 + 1)  # statistics that a reset would change
    bn_net.eval()
    before = state(bn_net)
    with pytest.raises(DataError, match="no batches"):
        recalibrate_batchnorm(bn_net, iter([]))
    assert same_state(bn_net, before)  # refused before touching the statistics


@pytest.mark.parametrize("method", ["mp", "falcon"])
def test_prune_recalibrates_on_the_data(bn_cnn, data, method):
    x, _ = data  # 240 samples, fewer than BN_SAMPLES: all of them are used
    before = state(bn_cnn)
    kw = dict(flops=0.4, method=method, progress=False)
    if method == "falcon":
        kw.update(n_gradients=100, n_validation=50, solver=fp.SolverOptions(max_iter=10))
    r = fp.prune(bn_cnn, data, recalibrate_bn=True, **kw)
    kept = fp.prune(bn_cnn, data, **kw)
    assert same_state(bn_cnn, before)
    assert r.config.recalibrate_bn == 1000 and kept.config.recalibrate_bn == 0
    assert r.details["batchnorm"] == "running statistics re-estimated on 240 samples after pruning"
    assert kept.details["batchnorm"] == "running statistics kept as trained"
    assert torch.equal(kept.model.b1.running_mean, bn_cnn.b1.running_mean)
    # the same weights (recalibration runs after the solve), new statistics: those of the data
    assert torch.equal(r.model.c1.weight, kept.model.c1.weight)
    with torch.no_grad():
        expected = r.model.c1(x).mean((0, 2, 3))
    assert torch.allclose(r.model.b1.running_mean, expected, atol=1e-5)
    assert not torch.allclose(r.model.b1.running_mean, bn_cnn.b1.running_mean, atol=1e-3)
    assert r.flops_fraction <= 0.4 + 1e-9
    assert not r.model.training and not r.model.b1.training


def test_prune_recalibrate_bn_counts_and_validation(bn_cnn, data):
    r = fp.prune(bn_cnn, data, flops=0.5, method="mp", recalibrate_bn=100, progress=False)
    assert r.details["batchnorm"].startswith("running statistics re-estimated on 100 samples")
    assert "batchnorm" in r.times
    for bad in (-1, "yes", 2.5):
        with pytest.raises(ConfigError, match="recalibrate_bn"):
            fp.prune(bn_cnn, data, flops=0.5, method="mp", recalibrate_bn=bad,
                     progress=False)
    plain = fp.prune(SmallCNN(), data, flops=0.5, method="mp", recalibrate_bn=True,
                     progress=False)
    assert plain.details["batchnorm"] == "no BatchNorm layers"


def test_falcon_pp_recalibrates_after_the_last_stage(bn_cnn, data, bfloat16_hardware):
    x, _ = data
    kw = dict(flops=0.3, method="falcon++", stages=2, n_gradients=60, samples_per_gradient=1,
              n_validation=60, solver=fp.multistage_options(cost_exponents=(0.5,)),
              progress=False)
    r = fp.prune(bn_cnn, data, recalibrate_bn=True, **kw)
    kept = fp.prune(bn_cnn, data, **kw)
    assert r.details["batchnorm"] == "running statistics re-estimated on 240 samples after pruning"
    # the stages (weights, trajectory) are those of the run without recalibration
    assert len(r.stages) == 2
    assert torch.equal(r.model.c2.weight, kept.model.c2.weight)
    assert r.stages == [dict(s, seconds=r.stages[i]["seconds"]) for i, s in enumerate(kept.stages)]
    with torch.no_grad():
        expected = r.model.c1(x).mean((0, 2, 3))
    assert torch.allclose(r.model.b1.running_mean, expected, atol=1e-5)
    assert r.flops_fraction <= 0.3 + 1e-9
