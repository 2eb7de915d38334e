"""Structured pruning (structure='channels'): coupled channel groups found with
Torch-Pruning's DependencyGraph, physical removal, budgets, floors, round_to, keep_layers,
export, gradual pruning and the command line."""

import copy
import math
import re
import sys

import numpy as np
import pytest
import torch
from helpers import (
    BatchNormCNN,
    DepthwiseNet,
    FixedHeadNet,
    GroupedConvNet,
    GroupedQueryNet,
    HeadAttentionNet,
    NoBiasCNN,
    NoGradCNN,
    SmallCNN,
    TinyEncoder,
    TinyResNet,
    same_state,
    small_data,
    state,
)
from torch import nn

import falcon_prune as fp
from falcon_prune import cli
from falcon_prune.analysis.costs import CostModel
from falcon_prune.analysis.structure import ParamSpace, channel_units, remove_channels
from falcon_prune.data.tasks import as_task
from falcon_prune.errors import (
    BudgetError,
    ConfigError,
    ConfigTypeError,
    DependencyError,
    FalconPruneError,
    ModelError,
)
from falcon_prune.models import MLPNet, load_model, resnet20
from falcon_prune.spaces.units import UnitSpace

TASK = as_task(None)
MP = dict(structure="channels", progress=False)
GRAD = dict(n_gradients=60, n_validation=60)


def settings(method):
    """Fast settings of each channel method."""
    kw = dict(MP)
    if method in ("falcon", "falcon++"):
        kw.update(GRAD)
    if method == "falcon++":
        kw["stages"] = 2
    return kw


def units_of(model, x, keep_layers=()):
    cm = CostModel.from_model(model, x, TASK.call)
    return channel_units(model, cm, x, TASK.call, keep_layers), cm


def ids(units, model, name):
    """The global entries of parameter ``name``, shaped like it."""
    p = dict(model.named_parameters())[name]
    return units.space.start(name) + torch.arange(p.numel()).view(p.shape)


def entries(units, k):
    return set(units.entries[units.ptr[k]:units.ptr[k + 1]].tolist())


def group_units(units, g):
    """The units of group g, ordered by channel."""
    idx = (units.group == g).nonzero().reshape(-1)
    return idx[torch.argsort(units.channel[idx])]


def group_owning(units, entry):
    """The group of the one unit that owns global ``entry``."""
    owners = units.unit_of_entries()[units.entries == entry]
    assert len(owners) == 1
    return int(units.group[owners[0]])


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def no_masks_left(model):
    hooks = [h for m in model.modules() for h in m._forward_pre_hooks.values()
             if isinstance(h, torch.nn.utils.prune.BasePruningMethod)]
    names = [n for n, _ in model.named_parameters() if n.endswith("_orig")]
    buffers = [n for n, _ in model.named_buffers() if n.endswith("_mask")]
    return not hooks and not names and not buffers and fp.masks_of(model) == {}


def randomize_batchnorm(model, seed=0):
    """Non-trivial BatchNorm statistics and affine parameters (so zeroing matters)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.3, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
            with torch.no_grad():
                m.weight.normal_(1, 0.3, generator=g)
                m.bias.normal_(0, 0.3, generator=g)
    return model.eval()


@pytest.fixture(scope="module")
def resnet():
    """TinyResNet, briefly trained on ``small_data`` (eval mode). Tests must not modify it."""
    torch.manual_seed(0)
    model = TinyResNet()
    x, y = small_data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


# -- 1, 2: the groups ----------------------------------------------------------------------
def test_param_space_is_every_parameter_in_order():
    model, x = TinyResNet().eval(), small_data(2)[0]
    cm = CostModel.from_model(model, x, TASK.call)
    space = ParamSpace.of(model, cm)
    params = list(model.named_parameters())
    assert space.names == [n for n, _ in params]
    assert space.offsets == [0, *np.cumsum([p.numel() for _, p in params]).tolist()]
    assert space.size == n_params(model)
    # the prunable weights map to the cost model's flat vector one to one, in order
    flat = space.flat
    assert sorted(flat[flat >= 0].tolist()) == list(range(cm.num_weights))
    for lay, a in zip(cm.layers, cm.offsets[:-1], strict=True):
        s = space.start(lay.name)
        assert torch.equal(flat[s:s + lay.numel], torch.arange(a, a + lay.numel))
    assert (flat[space.start("bn0.weight"):space.start("conv1.weight")] == -1).all()


def test_residual_network_groups():
    model, x = TinyResNet().eval(), small_data(2)[0]
    u, _ = units_of(model, x)
    assert u.m == 11 and len(u.groups) == 2
    res = group_owning(u, u.space.start("stem.weight"))
    inner = group_owning(u, u.space.start("bn1.weight"))
    assert res != inner
    res_units, inner_units = group_units(u, res), group_units(u, inner)
    assert len(res_units) == 6 and len(inner_units) == 5
    assert u.channel[res_units].tolist() == list(range(6))

    def part(name, c, column=False):
        t = ids(u, model, name)
        return set((t[:, c] if column else t[c]).reshape(-1).tolist())

    for c, k in enumerate(res_units.tolist()):
        want = (part("stem.weight", c) | part("bn0.weight", c) | part("bn0.bias", c)
                | part("conv1.weight", c, column=True) | part("conv2.weight", c)
                | part("bn2.weight", c) | part("bn2.bias", c)
                | part("fc.weight", c, column=True))
        assert entries(u, k) == want
        assert len(want) == 9 + 2 + 5 * 9 + 5 * 9 + 2 + 4
    for c, k in enumerate(inner_units.tolist()):
        want = (part("conv1.weight", c) | part("bn1.weight", c) | part("bn1.bias", c)
                | part("conv2.weight", c, column=True))
        assert entries(u, k) == want and len(want) == 54 + 2 + 54
    # the head's outputs and the stem's inputs are channels of no unit
    cover = u.cover
    fc_bias = ids(u, model, "fc.bias").reshape(-1)
    assert (cover[fc_bias] == 0).all()
    assert (cover[ids(u, model, "fc.weight").reshape(-1)] == 1).all()  # input side only
    assert (cover[ids(u, model, "stem.weight").reshape(-1)] == 1).all()  # output side only
    assert (cover[ids(u, model, "conv1.weight").reshape(-1)] == 2).all()
    assert not any(label.startswith("fc") for label in u.labels)


def test_depthwise_separable_groups():
    model, x = DepthwiseNet().eval(), torch.randn(2, 3, 8, 8)
    u, _ = units_of(model, x)
    dw = group_owning(u, u.space.start("dw.weight"))
    pw = group_owning(u, u.space.start("b3.weight"))
    assert dw != pw and len(u.groups) == 2
    assert group_owning(u, u.space.start("c1.weight")) == dw
    dw_units, pw_units = group_units(u, dw), group_units(u, pw)
    assert len(dw_units) == 8 and len(pw_units) == 4

    def part(name, c, column=False):
        t = ids(u, model, name)
        return set((t[:, c] if column else t[c]).reshape(-1).tolist())

    for c, k in enumerate(dw_units.tolist()):
        # the depthwise conv's channel c goes with c1's output c and pw's input c
        want = (part("c1.weight", c) | part("b1.weight", c) | part("b1.bias", c)
                | part("dw.weight", c) | part("b2.weight", c) | part("b2.bias", c)
                | part("pw.weight", c, column=True))
        assert entries(u, k) == want and len(want) == 27 + 2 + 9 + 2 + 4
    for c, k in enumerate(pw_units.tolist()):
        want = (part("pw.weight", c) | part("b3.weight", c) | part("b3.bias", c)
                | part("fc.weight", c, column=True))
        assert entries(u, k) == want
    assert (u.cover[ids(u, model, "fc.bias").reshape(-1)] == 0).all()
    assert (u.cover[ids(u, model, "c1.weight").reshape(-1)] == 1).all()


def test_shares_split_an_entry_among_its_owners():
    model, x = TinyResNet().eval(), small_data(2)[0]
    u, _ = units_of(model, x)
    ones = torch.ones(u.space.size)
    shares = u.shares(ones)
    # the shares of all units add up to the entries that some unit owns
    assert shares.sum().item() == pytest.approx(float((u.cover > 0).sum()))
    res = group_units(u, group_owning(u, u.space.start("stem.weight")))
    # a residual unit: 9 + 2 + 2 + 4 own entries, 45 + 45 shared with an inner unit
    assert shares[res[0]].item() == pytest.approx(17 + 45)


# -- 3: physical removal equals masking ---------------------------------------------------
REMOVAL_MODELS = {
    "tiny_resnet": (TinyResNet, (2, 1, 8, 8), 3),
    "depthwise": (DepthwiseNet, (2, 3, 8, 8), 3),
    "bn_cnn": (BatchNormCNN, (2, 1, 8, 8), 3),
    "cnn_with_biases": (SmallCNN, (2, 1, 8, 8), 3),
    "resnet20": (resnet20, (1, 3, 32, 32), 1),
    "heads": (HeadAttentionNet, (2, 5, 8), 3),
}


@pytest.mark.parametrize("name", list(REMOVAL_MODELS))
def test_removing_channels_equals_masking_them(name):
    make, shape, trials = REMOVAL_MODELS[name]
    for seed in range(trials):
        torch.manual_seed(seed)
        model = randomize_batchnorm(make(), seed)
        x = torch.randn(*shape)
        u, _ = units_of(model, x)
        g = torch.Generator().manual_seed(seed)
        keep = torch.rand(u.m, generator=g) < 0.5
        for gi in range(len(u.groups)):  # at least one channel of every group
            keep[group_units(u, gi)[seed % int((u.group == gi).sum())]] = True
        assert not keep.all()
        alive = u.alive_entries(keep)
        masked = copy.deepcopy(model)
        original = {n: p.detach().clone() for n, p in model.named_parameters()}
        with torch.no_grad():
            for n, p in masked.named_parameters():
                a = u.space.start(n)
                p.mul_(alive[a:a + p.numel()].view_as(p).to(p.dtype))
        remove_channels(u, keep)
        assert n_params(model) == int(alive.sum()) < u.space.size
        with torch.no_grad():
            small, full = model(x), masked(x)
        assert small.shape == full.shape
        assert torch.allclose(small, full, atol=1e-5, rtol=1e-4)
        # the surviving values, in order, are exactly the small model's parameters
        for n, p in model.named_parameters():
            a = u.space.start(n)
            want = original[n].reshape(-1)[alive[a:a + original[n].numel()]]
            assert torch.equal(p.detach().reshape(-1), want), n


def test_weight_mask_and_alive_entries_agree():
    model, x = TinyResNet().eval(), small_data(2)[0]
    u, cm = units_of(model, x)
    keep = torch.ones(u.m, dtype=torch.bool)
    assert u.alive_entries(keep).all() and u.weight_mask(keep).all()
    keep[0] = False  # one residual channel
    alive, wmask = u.alive_entries(keep), u.weight_mask(keep)
    assert len(wmask) == cm.num_weights
    sel = u.space.flat >= 0
    assert torch.equal(wmask[u.space.flat[sel]], alive[sel])
    assert int((~alive).sum()) == len(entries(u, 0))


# -- 4: budgets ----------------------------------------------------------------------------
CHANNEL_METHODS = ("mp", "mp_flops", "falcon", "falcon++")
BUDGETS = [(0.5, None), (0.25, None), (None, 0.5)]


def check_result(r, model, x, flops, nnz):
    if flops is not None:
        assert r.flops_fraction <= flops
    _, dense = fp.count_macs(model, x[:1])
    kept, _ = fp.count_macs(r.model, x[:1])
    assert kept == pytest.approx(r.flops_fraction * dense, rel=1e-9)
    if flops is not None:
        assert kept / dense <= flops + 1e-12
    ratio = n_params(r.model) / n_params(model)
    assert ratio == pytest.approx(r.nnz_fraction)
    if nnz is not None:
        assert ratio <= nnz
    assert n_params(r.model) < n_params(model)
    assert no_masks_left(r.model)
    match = re.fullmatch(r"(\d+) of (\d+) channels kept", r.details["units"])
    assert match, r.details["units"]
    kept_units, total = int(match[1]), int(match[2])
    removed = r.details["removed_channels"]
    assert sum(len(v) for v in removed.values()) == total - kept_units > 0
    assert all(len(set(v)) == len(v) for v in removed.values())
    with torch.no_grad():
        assert r.model(x[:3]).shape == model(x[:3]).shape


@pytest.mark.parametrize("method", CHANNEL_METHODS)
@pytest.mark.parametrize("which", ["bn_cnn", "tiny_resnet"])
def test_budgets_are_never_exceeded(method, which, bn_cnn, resnet, data):
    model = bn_cnn if which == "bn_cnn" else resnet
    before = state(model)
    x, _ = data
    for flops, nnz in BUDGETS:
        r = fp.prune(model, data, flops=flops, nnz=nnz, method=method, **settings(method))
        check_result(r, model, x, flops, nnz)
        assert r.config.structure == "channels" and r.method == method
        removed = r.details["removed_channels"]
        if which == "bn_cnn":
            assert r.model.c1.out_channels == 6 - len(removed.get("c1", []))
            assert r.model.c2.out_channels == 8 - len(removed.get("c2", []))
        else:
            res = [k for k in removed if k != "conv1"]
            n_res = 6 - sum(len(removed[k]) for k in res)
            assert r.model.stem.out_channels == r.model.conv2.out_channels == n_res
            assert r.model.fc.in_features == r.model.bn0.num_features == n_res
            assert r.model.conv1.out_channels == 5 - len(removed.get("conv1", []))
    assert same_state(model, before)


@pytest.mark.parametrize("method", ["mp", "mp_flops"])
def test_both_budgets_at_once(method, bn_cnn, data):
    r = fp.prune(bn_cnn, data, flops=0.45, nnz=0.35, method=method, **settings(method))
    check_result(r, bn_cnn, data[0], 0.45, 0.35)


def test_falcon_chooses_better_channels_than_magnitude(cnn, data):
    losses = {}
    for method in ("mp", "mp_flops", "falcon"):
        r = fp.prune(cnn, data, flops=0.5, method=method, **settings(method))
        losses[method] = fp.evaluate(r.model, data).loss
    assert losses["falcon"] < min(losses["mp"], losses["mp_flops"]), losses


# -- 5: export -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pruned_resnet(resnet):
    return fp.prune(resnet, small_data(), flops=0.5, method="mp", **MP).model.eval()


def test_torch_export_of_the_pruned_network(pruned_resnet):
    x = small_data(8, seed=3)[0]
    ep = torch.export.export(pruned_resnet, (x,))
    with torch.no_grad():
        assert torch.allclose(ep.module()(x), pruned_resnet(x), atol=1e-6)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the legacy (TorchScript) exporter
def test_onnx_export_of_the_pruned_network(pruned_resnet, tmp_path):
    pytest.importorskip("onnx", reason="ONNX export needs onnx: pip install onnx")
    ort = pytest.importorskip("onnxruntime",
                              reason="running the ONNX file needs onnxruntime: pip install "
                                     "onnxruntime")
    x = small_data(8, seed=3)[0]
    path = tmp_path / "pruned.onnx"
    torch.onnx.export(pruned_resnet, (x,), str(path), input_names=["x"],
                      output_names=["logits"], dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        want = pruned_resnet(x).numpy()
    assert out.shape == want.shape
    assert np.abs(out - want).max() < 1e-4


# -- 6: bad input --------------------------------------------------------------------------
def refused(model, exc, match, data=None, **kw):
    before = state(model)
    with pytest.raises(exc, match=match) as info:
        fp.prune(model, data if data is not None else small_data(), **kw)
    assert isinstance(info.value, FalconPruneError)
    assert same_state(model, before)
    return info.value


def test_a_model_without_an_autograd_graph_is_refused():
    # Torch-Pruning traces nothing (no grad_fn), so no channel groups are found
    refused(NoGradCNN().eval(), ModelError,
            "no channels that can be removed|could not be traced", flops=0.5, method="mp", **MP)


def test_an_untraceable_model_is_reported_as_untraceable():
    refused(NoGradCNN().eval(), ModelError, "trac", flops=0.5, method="mp", **MP)


@pytest.mark.parametrize("method", ["mp", "falcon"])
def test_budgets_below_what_the_fixed_layers_need(method, data):
    model = FixedHeadNet().eval()
    kw = settings(method)
    # below the raw-pixel columns of the head (30 %) and below one channel (47.6 %)
    for flops in (0.25, 0.4):
        err = refused(model, BudgetError, "layers kept whole", flops=flops, method=method, **kw)
        assert "raise the budget" in str(err)
    refused(model, BudgetError, "parameter budget", nnz=0.5, method=method, **kw)
    r = fp.prune(model, data, flops=0.5, method=method, **kw)  # one channel fits
    assert r.flops_fraction <= 0.5 and r.model.c1.out_channels == 1
    assert r.model.fc.in_features == 65


@pytest.mark.parametrize("method", ["woodfisher", "chita"])
def test_single_weight_methods_refuse_channels(method):
    kw = dict(n_gradients=60)
    refused(SmallCNN().eval(), ConfigError, "structure='channels' supports", flops=0.5,
            method=method, **kw, **MP)
    with pytest.raises(ConfigError, match="chooses single weights only"):
        fp.defaults(method, "channels")


@pytest.mark.parametrize("method,kw,match", [
    ("falcon++", dict(revive=True), "does not take revive"),
    ("falcon", dict(block_size=4), "does not take block_size"),
    ("mp", dict(obs_rank=8), "obs_rank is the rank of falcon's group OBS"),
    ("mp", dict(round_to=0), "round_to must be an integer >= 1"),
    ("mp", dict(structure="filters"), "structure must be one of"),
])
def test_settings_refused_with_channels(method, kw, match):
    kw = {**MP, **kw}
    if method in ("falcon", "falcon++"):
        kw.update(GRAD)
    refused(SmallCNN().eval(), ConfigError, match, flops=0.5, method=method, **kw)


@pytest.mark.parametrize("kw", [dict(round_to=2), dict(keep_layers=["c1"]),
                                dict(obs_rank=4)])
def test_channel_settings_refused_with_weights(kw):
    method = "falcon" if "obs_rank" in kw else "mp"
    extra = GRAD if method == "falcon" else {}
    refused(SmallCNN().eval(), ConfigError, "apply to structure='channels'", flops=0.5,
            method=method, progress=False, **extra, **kw)


def test_keep_layers_errors():
    refused(SmallCNN().eval(), ModelError, r"keep_layers names modules .*\['nope'\]",
            flops=0.5, method="mp", keep_layers=["c1", "nope"], **MP)
    refused(SmallCNN().eval(), ConfigTypeError, "list of module names", flops=0.5,
            method="mp", keep_layers="c1", **MP)


def test_config_structure_given_twice_must_agree():
    cfg = fp.defaults("mp", "channels")
    assert cfg.structure == "channels" and cfg.keep_layers == ()
    with pytest.raises(ConfigError, match="give the structure in one place"):
        fp.prune(SmallCNN(), small_data(), flops=0.5, config=cfg, structure="weights",
                 progress=False)


def test_missing_torch_pruning_is_a_dependency_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # `import torch_pruning` fails
    err = refused(SmallCNN().eval(), DependencyError, "Torch-Pruning", flops=0.5,
                  method="mp", **MP)
    assert "pip install 'falcon-prune[structured]'" in str(err)
    assert isinstance(err, ImportError)
    # unstructured pruning does not need it
    r = fp.prune(SmallCNN().eval(), small_data(), flops=0.5, method="mp", progress=False)
    assert r.flops_fraction <= 0.5


# -- 7: floors -----------------------------------------------------------------------------
@pytest.mark.parametrize("kw,want", [
    ({}, [1, 1]),
    (dict(min_density=0.5), [3, 3]),
    (dict(min_density=0.7), [5, 4]),
    (dict(allow_empty_layers=True), [0, 0]),
    (dict(min_density=0.5, allow_empty_layers=True), [3, 3]),
])
def test_unit_floors(kw, want):
    model, x = TinyResNet().eval(), small_data(2)[0]
    cm = CostModel.from_model(model, x, TASK.call)
    cfg = fp.defaults("mp", "channels").replace(**kw)
    st = UnitSpace.build(model, cm, x, TASK.call, cfg.replace(task=TASK))
    sizes = torch.bincount(st.units.group).tolist()
    by_size = dict(zip(sizes, st.floors.tolist(), strict=True))
    assert [by_size[6], by_size[5]] == want
    d = kw.get("min_density", 0.0)
    assert all(f >= math.ceil(d * c - 1e-9) for c, f in by_size.items())


@pytest.mark.parametrize("method", CHANNEL_METHODS)
def test_every_group_keeps_a_channel_at_the_least_budget(method, resnet, data):
    # the least possible: one residual and one inner channel (4.55 % of the MACs)
    r = fp.prune(resnet, data, flops=0.05, method=method, **settings(method))
    assert r.flops_fraction <= 0.05
    assert r.model.conv2.out_channels == r.model.stem.out_channels == 1
    assert r.model.conv1.out_channels == 1
    refused(resnet, BudgetError, "least channels of every group", flops=0.04, method=method,
            **settings(method))


@pytest.mark.parametrize("method", ["mp", "mp_flops", "falcon"])
def test_min_density_keeps_a_fraction_of_every_group(method, bn_cnn, data):
    r = fp.prune(bn_cnn, data, flops=0.4, method=method, min_density=0.5, **settings(method))
    assert r.flops_fraction <= 0.4
    assert r.model.c1.out_channels >= 3 and r.model.c2.out_channels >= 4
    assert r.model.c1.out_channels + r.model.c2.out_channels < 14
    # 3 of c1 and 4 of c2 need 33.4 % of the MACs
    refused(bn_cnn, BudgetError, "lower min_density", flops=0.3, method=method,
            min_density=0.5, **settings(method))


def test_allow_empty_layers_is_refused_for_channels(bn_cnn):
    # one channel per group needs 6.96 %: refused by default, and a group can never be
    # emptied (a layer with no channel cannot run), so the opt-in is refused too
    refused(bn_cnn, BudgetError, "least channels of every group", flops=0.05, method="mp",
            **MP)
    refused(bn_cnn, fp.errors.ConfigError, "at least one channel", flops=0.05, method="mp",
            allow_empty_layers=True, **MP)


# -- 8: round_to ---------------------------------------------------------------------------
def multiple_or_all(kept, total, k):
    return kept == total or (kept > 0 and kept % k == 0)


@pytest.mark.parametrize("method", CHANNEL_METHODS)
def test_round_to_keeps_multiples(method, bn_cnn, resnet, data):
    for flops in (0.8, 0.6, 0.45):
        r = fp.prune(bn_cnn, data, flops=flops, method=method, round_to=4, **settings(method))
        assert r.flops_fraction <= flops and r.config.round_to == 4
        assert multiple_or_all(r.model.c1.out_channels, 6, 4)
        assert multiple_or_all(r.model.c2.out_channels, 8, 4)
    r = fp.prune(resnet, data, nnz=0.5, method=method, round_to=2, **settings(method))
    assert n_params(r.model) / n_params(resnet) <= 0.5
    assert multiple_or_all(r.model.conv2.out_channels, 6, 2)
    assert multiple_or_all(r.model.conv1.out_channels, 5, 2)


def test_round_to_on_resnet20():
    torch.manual_seed(0)
    model = randomize_batchnorm(resnet20())
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    r = fp.prune(model, (x, y), flops=0.5, method="mp_flops", round_to=8, **MP)
    assert r.flops_fraction <= 0.5
    convs = [m for m in r.model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.out_channels % 8 == 0 for c in convs), [c.out_channels for c in convs]
    assert n_params(r.model) < n_params(model)


def test_round_to_budget_below_one_block_per_group_is_a_budget_error(bn_cnn):
    # one block of 4 channels in each group needs 44.5 % of the MACs
    refused(bn_cnn, BudgetError, "budget", flops=0.3, method="mp", round_to=4, **MP)


# -- 9: keep_layers ------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["mp", "mp_flops", "falcon"])
def test_keep_layers_keeps_output_channels(method, bn_cnn, resnet, data):
    r = fp.prune(bn_cnn, data, flops=0.5, method=method, keep_layers=["c1"],
                 **settings(method))
    assert r.flops_fraction <= 0.5 and r.config.keep_layers == ("c1",)
    assert r.model.c1.out_channels == 6 and r.model.c2.in_channels == 6
    assert r.model.c2.out_channels < 8 and "c1" not in r.details["removed_channels"]
    # the stem's channels are the residual ones: all of them stay
    r = fp.prune(resnet, data, flops=0.6, method=method, keep_layers=["stem"],
                 **settings(method))
    assert r.model.stem.out_channels == r.model.conv2.out_channels == 6
    assert r.model.conv1.out_channels < 5


def test_keep_layers_drops_the_group_from_the_units():
    model, x = TinyResNet().eval(), small_data(2)[0]
    for name in ("stem", "bn2"):
        u, _ = units_of(model, x, keep_layers=(name,))
        assert u.m == 5 and len(u.groups) == 1
        assert (u.cover[ids(u, model, "stem.weight").reshape(-1)] == 0).all()
        assert (u.cover[ids(u, model, "conv1.weight").reshape(-1)] == 1).all()


# -- grouped convolutions and classifiers behind an output function -------------------------
def test_a_classifier_behind_log_softmax_keeps_its_classes():
    torch.manual_seed(0)
    model = MLPNet().eval()
    x, y = torch.randn(200, 1, 28, 28), torch.randint(0, 10, (200,))
    r = fp.prune(model, (x, y), flops=0.3, method="mp", **MP)
    with torch.no_grad():
        assert r.model(x[:2]).shape == (2, 10)
    u, _ = units_of(model, x[:2])
    assert not any(label.startswith("fc3") for label in u.labels)


def test_grouped_convolution_gives_a_working_network_or_a_clear_refusal(data):
    model = randomize_batchnorm(GroupedConvNet())
    try:
        r = fp.prune(model, data, flops=0.7, method="mp", **MP)
    except FalconPruneError:
        return
    assert r.flops_fraction <= 0.7
    assert r.model.c2.in_channels % 4 == 0 and r.model.c2.out_channels % 4 == 0
    with torch.no_grad():
        assert r.model(data[0][:2]).shape == (2, 4)


# -- 10: gradual ---------------------------------------------------------------------------
GKW = dict(stages=2, epochs_per_stage=1, final_epochs=1, batch_size=32, progress=False,
           structure="channels")


@pytest.mark.parametrize("method", ["mp", "falcon"])
def test_gradual_channels_returns_a_smaller_network(method, bn_cnn, data):
    before = state(bn_cnn)
    eval_data = small_data(64, seed=1)
    step = dict(n_gradients=40, n_validation=40) if method == "falcon" else {}
    r = fp.gradual(bn_cnn, data, flops=0.4, nnz=0.6, method=method, eval_data=eval_data,
                   **GKW, **step)
    assert same_state(bn_cnn, before)
    assert no_masks_left(r.model)
    assert r.flops_fraction <= 0.4 and r.nnz_fraction <= 0.6
    kept, _ = fp.count_macs(r.model, data[0][:1])
    _, dense = fp.count_macs(bn_cnn, data[0][:1])
    assert kept / dense == pytest.approx(r.flops_fraction) and kept / dense <= 0.4 + 1e-12
    assert n_params(r.model) / n_params(bn_cnn) == pytest.approx(r.nnz_fraction)
    assert r.model.c1.out_channels + r.model.c2.out_channels < 14
    assert [row["phase"] for row in r.history] == ["prune", "finetune", "prune", "finetune",
                                                   "final"]
    assert all(row["units_kept"] >= 2 for row in r.history if row["phase"] == "prune")
    # the physically smaller network computes what the masked one was evaluated as
    ev = fp.evaluate(r.model, eval_data)
    assert ev.loss == pytest.approx(r.history[-1]["eval_loss"], rel=1e-4, abs=1e-6)


def test_gradual_channels_budget_below_the_floors(bn_cnn, data):
    before = state(bn_cnn)
    with pytest.raises(BudgetError, match="least channels of every group"):
        fp.gradual(bn_cnn, data, flops=0.05, method="mp", **GKW)
    assert same_state(bn_cnn, before)


def interrupted_and_resumed(model, data, tmp_path, **kw):
    """(an uninterrupted run, a run interrupted after its second pruning step and
    resumed from its checkpoint)."""
    full = fp.gradual(model, data, checkpoint_dir=tmp_path / "a", **kw)

    class Stop(Exception):
        pass

    def interrupt(row):
        if row["event"] == 3:  # after the second pruning step
            raise Stop

    with pytest.raises(Stop):
        fp.gradual(model, data, checkpoint_dir=tmp_path / "b", callback=interrupt, **kw)
    torch.manual_seed(999)
    return full, fp.gradual(model, data, checkpoint_dir=tmp_path / "b", resume=True, **kw)


def assert_same_network(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(sa[k].shape == sb[k].shape for k in sa)
    assert all(torch.allclose(sa[k].float(), sb[k].float(), atol=1e-6) for k in sa)


def test_gradual_channels_resume_gives_the_same_network(data, tmp_path):
    torch.manual_seed(0)
    model = NoBiasCNN().eval()
    kw = dict(flops=0.4, method="falcon", **GKW, **GRAD)
    full, resumed = interrupted_and_resumed(model, data, tmp_path, **kw)
    assert_same_network(full.model, resumed.model)
    assert n_params(full.model) < n_params(model)
    assert [r["event"] for r in resumed.history] == [1, 2, 3, 4, 5]
    assert resumed.flops_fraction == pytest.approx(full.flops_fraction)
    assert full.flops_fraction <= 0.4


@pytest.mark.parametrize("which", ["cnn", "bn_cnn"])
def test_gradual_channels_resume_with_biases_and_batchnorm(which, cnn, bn_cnn, data, tmp_path):
    model = cnn if which == "cnn" else bn_cnn
    kw = dict(flops=0.4, method="mp", **GKW)
    full, resumed = interrupted_and_resumed(model, data, tmp_path, **kw)
    assert_same_network(full.model, resumed.model)


# -- 11: the command line ------------------------------------------------------------------
@pytest.fixture
def files(tmp_path):
    """A random MLPNet checkpoint and a small MNIST-like .npz."""
    torch.manual_seed(0)
    ckpt = tmp_path / "mlp.pt"
    torch.save({"state_dict": MLPNet().state_dict()}, ckpt)
    g = np.random.default_rng(0)
    npz = tmp_path / "digits.npz"
    np.savez(npz, train_images=g.integers(0, 255, (300, 28, 28), dtype=np.uint8),
             train_labels=g.integers(0, 10, 300),
             test_images=g.integers(0, 255, (50, 28, 28), dtype=np.uint8),
             test_labels=g.integers(0, 10, 50))
    return ckpt, npz


def test_cli_prune_channels_and_evaluate(files, tmp_path, capsys):
    ckpt, npz = files
    out = tmp_path / "pruned.pt"
    args = ["prune", "--model", "mlpnet", "--checkpoint", str(ckpt), "--dataset", "mnist",
            "--data", str(npz), "--flops", "0.3", "--n-gradients", "50", "--n-validation",
            "50", "--output", str(out), "--no-progress", "--structure", "channels",
            "--round-to", "4", "--keep-layers", "fc2"]
    assert cli.main(args) == 0
    saved = torch.load(out, weights_only=False)
    small = saved["module"]
    assert isinstance(small, MLPNet)
    assert small.fc1.out_features < 40 and small.fc1.out_features % 4 == 0
    assert small.fc2.out_features == 20 and small.fc3.out_features == 10
    assert saved["report"]["flops_fraction"] <= 0.3
    assert saved["report"]["config"]["structure"] == "channels"
    loaded = load_model("mlpnet", out)
    assert loaded.fc1.weight.shape == small.fc1.weight.shape
    capsys.readouterr()
    assert cli.main(["evaluate", "--model", "mlpnet", "--checkpoint", str(out), "--dataset",
                     "mnist", "--data", str(npz)]) == 0
    text = capsys.readouterr().out
    m = re.search(r"FLOPs kept ([0-9.]+) \(([0-9,]+) of ([0-9,]+) MACs\)", text)
    assert m, text
    fraction, kept, dense = float(m[1]), int(m[2].replace(",", "")), int(m[3].replace(",", ""))
    assert dense == 784 * 40 + 40 * 20 + 20 * 10  # the dense zoo model
    assert kept == 784 * small.fc1.out_features + small.fc1.out_features * 20 + 20 * 10
    assert fraction <= 0.3
    assert fraction == pytest.approx(saved["report"]["flops_fraction"], abs=1e-4)


@pytest.mark.filterwarnings("ignore:the pruned network ran")
def test_cli_latency_budget(files, tmp_path, capsys, shape_clock):
    ckpt, npz = files
    out = tmp_path / "fast.pt"
    args = ["prune", "--model", "mlpnet", "--checkpoint", str(ckpt), "--dataset", "mnist",
            "--data", str(npz), "--flops", "0.9", "--latency", "0.9", "--latency-batch",
            "256", "--method", "mp_flops", "--output", str(out), "--no-progress",
            "--structure", "channels"]
    assert cli.main(args) == 0
    report = torch.load(out, weights_only=False)["report"]
    assert report["config"]["latency_batch"] == 256 and report["config"]["round_to"] == 4
    lat = report["details"]["latency"]
    assert lat["budget"] == 0.9 and lat["predicted_fraction"] <= 0.9 + 1e-9
    assert report["flops_fraction"] <= 0.9
    capsys.readouterr()
    bad = args[:-2]  # without --structure channels: refused before any work, no traceback
    assert cli.main(bad) == 2
    err = capsys.readouterr().err
    assert "structure='channels'" in err and "Traceback" not in err


def test_cli_round_to_needs_channels(files, tmp_path, capsys):
    ckpt, npz = files
    out = tmp_path / "o.pt"
    args = ["prune", "--model", "mlpnet", "--checkpoint", str(ckpt), "--dataset", "mnist",
            "--data", str(npz), "--flops", "0.3", "--method", "mp", "--output", str(out),
            "--no-progress", "--round-to", "4"]
    assert cli.main(args) == 2
    assert "--round-to and --keep-layers apply to --structure channels" in \
        capsys.readouterr().err
    assert not out.exists()


def test_magnitude_prefix_is_the_longest_fitting_prefix():
    """select_prefix_units bisects the prefix length: the same units as adding them one by
    one in score order until the next one no longer fits."""
    from falcon_prune.selection.units import UnitBudget, UnitCosts, select_prefix_units

    model, x = TinyResNet().eval(), small_data(2)[0]
    u, cm = units_of(model, x)
    flat = u.space.flat
    entry_cost = torch.zeros(u.space.size, dtype=torch.float64)
    entry_cost[flat >= 0] = cm.per_weight_costs()[flat[flat >= 0]]
    costs = UnitCosts(u, entry_cost)
    scores = torch.rand(u.m, generator=torch.Generator().manual_seed(0))
    allowed = torch.ones(u.m, dtype=torch.bool)
    dense_c, dense_s = costs.exact(allowed)
    for frac in (0.9, 0.6, 0.3):
        budget = UnitBudget(frac * dense_c, frac * dense_s + 1,
                            torch.zeros(len(u.groups), dtype=torch.int64))
        keep = torch.zeros(u.m, dtype=torch.bool)
        for k in torch.argsort(scores, descending=True, stable=True).tolist():
            keep[k] = True
            if not costs.fits(keep, budget):
                keep[k] = False
                break
        assert torch.equal(select_prefix_units(scores, costs, budget, allowed), keep)


@pytest.mark.parametrize("method", ["mp", "falcon"])
def test_transformer_encoder_loses_mlp_units_and_keeps_its_attention_width(method):
    """MLP hidden units are removable groups; the residual stream that attention reads is
    kept whole (its heads must divide the width)."""
    torch.manual_seed(0)
    model = TinyEncoder(32, 4, 64).eval()
    x, y = torch.randn(200, 5, 8), torch.randint(0, 3, (200,))
    kw = {} if method == "mp" else {"n_gradients": 60, "n_validation": 60}
    r = fp.prune(model, (x, y), flops=0.6, structure="channels", method=method,
                 progress=False, **kw)
    assert r.flops_fraction <= 0.6
    for layer in r.model.enc.layers:
        assert layer.self_attn.embed_dim == 32 and layer.linear1.out_features < 64
    assert r.model(x[:2]).shape == (2, 3)


def test_attention_heads_are_units_found_from_the_model_reshape():
    """q/k/v outputs viewed as (N, T, heads, d): their coupled group is cut into heads of
    d channels (with the output projection's columns); other groups stay channels."""
    from falcon_prune.analysis.structure import head_sizes

    torch.manual_seed(0)
    model, x = HeadAttentionNet().eval(), torch.randn(2, 5, 8)
    assert head_sizes(model, x, lambda m, b: m(b)) == {"query": 4, "key": 4, "value": 4}
    u, _ = units_of(model, x)
    assert sorted(u.widths) == [1, 1, 4]
    heads = [lab for lab in u.labels if "head" in lab]
    assert len(heads) == 4


@pytest.mark.parametrize("method", ["mp", "falcon"])
def test_pruning_heads_gives_a_smaller_working_attention(method):
    torch.manual_seed(0)
    model = HeadAttentionNet().eval()
    x, y = torch.randn(200, 5, 8), torch.randint(0, 3, (200,))
    kw = {} if method == "mp" else {"n_gradients": 60, "n_validation": 60}
    r = fp.prune(model, (x, y), flops=0.3, structure="channels", method=method,
                 progress=False, **kw)
    small = r.model
    assert r.flops_fraction <= 0.3
    widths = {small.query.out_features, small.key.out_features, small.value.out_features,
              small.out.in_features}
    assert len(widths) == 1 and widths.pop() % 4 == 0  # whole heads
    assert small(x[:2]).shape == (2, 3)
    # with the other layers kept whole, only heads can go: 1 of 4 fits 40 % of the MACs
    r = fp.prune(model, (x, y), flops=0.4, structure="channels", method=method,
                 progress=False, keep_layers=["inp", "out"], **kw)
    assert r.flops_fraction <= 0.4 and r.model.query.out_features == 4
    assert r.model(x[:2]).shape == (2, 3)
    removed = r.details["removed_channels"]
    assert all(len(v) % 4 == 0 for k, v in removed.items() if k in ("query", "value"))


def test_grouped_query_attention_is_refused_with_the_layers_to_keep():
    """Fewer key/value heads than query heads: the heads cannot be removed together, so the
    run names the layers to keep; with them kept, the rest is pruned within the budget."""
    torch.manual_seed(0)
    model = GroupedQueryNet().eval()
    x, y = torch.randn(100, 5, 8), torch.randint(0, 3, (100,))
    before = state(model)
    with pytest.raises(ModelError, match=r"keep_layers=\['key', 'query', 'value'\]"):
        fp.prune(model, (x, y), flops=0.5, structure="channels", method="mp", progress=False)
    assert same_state(model, before)
    r = fp.prune(model, (x, y), flops=0.5, structure="channels", method="mp", progress=False,
                 keep_layers=["query", "key", "value"])
    assert r.flops_fraction <= 0.5 and r.model.query.out_features == 16
    assert r.model(x[:2]).shape == (2, 3)
