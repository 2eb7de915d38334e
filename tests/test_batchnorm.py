"""Re-estimating BatchNorm statistics: the function itself and prune's recalibrate_bn."""

import pytest
import torch
from helpers import SmallCNN, same_state, small_data, state, trained_bn_cnn
from torch import nn

import falcon_prune as fp
from falcon_prune.batchnorm import recalibrate_batchnorm


def test_statistics_are_the_average_over_the_batches_and_modes_are_restored():
    torch.manual_seed(0)
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


def test_no_batchnorm_and_no_batches():
    net = SmallCNN()
    before = state(net)
    assert recalibrate_batchnorm(net, torch.randn(4, 1, 8, 8)) == 0
    assert same_state(net, before)
    bn_net = trained_bn_cnn(steps=5)
    before = state(bn_net)
    with pytest.raises(ValueError, match="no batches"):
        recalibrate_batchnorm(bn_net, iter([]))
    assert same_state(bn_net, before)  # refused before touching the statistics


@pytest.mark.parametrize("method", ["mp", "falcon"])
def test_prune_recalibrates_on_the_data(method):
    model = trained_bn_cnn()
    x, y = small_data()  # 240 samples, fewer than BN_SAMPLES: all of them are used
    before = state(model)
    kw = dict(flops=0.4, method=method, progress=False, n_gradients=100, n_validation=50) \
        if method == "falcon" else dict(flops=0.4, method=method, progress=False)
    r = fp.prune(model, (x, y), recalibrate_bn=True, **kw)
    kept = fp.prune(model, (x, y), **kw)
    assert same_state(model, before)
    assert r.details["batchnorm"] == "running statistics re-estimated on 240 samples after pruning"
    assert kept.details["batchnorm"] == "running statistics kept as trained"
    assert torch.equal(kept.model.b1.running_mean, model.b1.running_mean)
    # the same weights (recalibration runs after the solve), new statistics: those of the data
    assert torch.equal(r.model.c1.weight, kept.model.c1.weight)
    with torch.no_grad():
        expected = r.model.c1(x).mean((0, 2, 3))
    assert torch.allclose(r.model.b1.running_mean, expected, atol=1e-5)
    assert r.flops_fraction <= 0.4 + 1e-9


def test_prune_recalibrate_bn_counts_and_validation():
    model = trained_bn_cnn(steps=20)
    x, y = small_data()
    r = fp.prune(model, (x, y), flops=0.5, method="mp", recalibrate_bn=100, progress=False)
    assert r.details["batchnorm"].startswith("running statistics re-estimated on 100 samples")
    for bad in (-1, "yes", 2.5):
        with pytest.raises(ValueError, match="recalibrate_bn"):
            fp.prune(model, (x, y), flops=0.5, method="mp", recalibrate_bn=bad,
                     progress=False)
    plain = fp.prune(SmallCNN(), (x, y), flops=0.5, method="mp", recalibrate_bn=True,
                     progress=False)
    assert plain.details["batchnorm"] == "no BatchNorm layers"


def test_falcon_pp_recalibrates_after_the_last_stage():
    model = trained_bn_cnn()
    x, y = small_data()
    kw = dict(flops=0.3, method="falcon++", stages=3, n_gradients=60, samples_per_gradient=1,
              n_validation=60, progress=False)
    r = fp.prune(model, (x, y), recalibrate_bn=True, **kw)
    kept = fp.prune(model, (x, y), **kw)
    assert r.details["batchnorm"] == "running statistics re-estimated on 240 samples after pruning"
    # the stages (weights, trajectory) are those of the run without recalibration
    assert torch.equal(r.model.c2.weight, kept.model.c2.weight)
    assert r.stages == [dict(s, seconds=r.stages[i]["seconds"]) for i, s in enumerate(kept.stages)]
    with torch.no_grad():
        expected = r.model.c1(x).mean((0, 2, 3))
    assert torch.allclose(r.model.b1.running_mean, expected, atol=1e-5)
    assert r.flops_fraction <= 0.3 + 1e-9
