"""The cost model: per-weight MACs read at the operation level, against FlopCounterMode."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import SmallCNN
from torch import nn
from torch.nn.utils import prune as torch_prune
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import falcon_prune as fp
from falcon_prune.analysis.costs import CostModel
from falcon_prune.errors import ConfigError, ModelError
from falcon_prune.models import MLPNet, mobilenet_v1, resnet20


class TinyTransformerBlock(nn.Module):
    """Linear layers on (batch, tokens, features) sequences."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.h = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.mlp1, self.mlp2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x):
        b, n, d = x.shape
        y = self.ln1(x)
        q, k, v = (m(y).view(b, n, self.h, -1).transpose(1, 2) for m in (self.q, self.k, self.v))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.h), -1) @ v
        x = x + self.o(a.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp2(torch.relu(self.mlp1(self.ln2(x))))


class Conv1d3dNet(nn.Module):
    """Conv1d with stride, padding and dilation; grouped Conv3d; a Linear called twice."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 8, 5, stride=2, padding=1, dilation=2)
        self.c3 = nn.Conv3d(2, 6, 3, stride=(1, 2, 2), padding=1, groups=2)
        self.fc = nn.Linear(8, 3)

    def forward(self, x1, x3):
        a = self.c1(x1).mean(-1)
        b = self.c3(x3).mean((2, 3, 4))
        return self.fc(a) + self.fc(a) + b[:, :3]  # fc called twice


class StridedGroupedCNN(nn.Module):
    """Conv2d with stride, padding, dilation and groups, and a depthwise convolution."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 8, 3, stride=2, padding=2, dilation=2, groups=2)
        self.dw = nn.Conv2d(8, 8, 5, stride=1, padding=2, groups=8, bias=False)
        self.b = nn.Conv2d(8, 6, (3, 1), stride=(1, 2), padding=(1, 0))
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = self.b(F.relu(self.dw(F.relu(self.a(x)))))
        return self.fc(x.mean((2, 3)))


class Attention(nn.Module):
    """nn.MultiheadAttention: its out_proj Linear is used through F.linear, never called."""

    def __init__(self, d=16, heads=4, need_weights=False):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.head = nn.Linear(d, 3)
        self.need_weights = need_weights

    def forward(self, x):
        y = self.attn(x, x, x, need_weights=self.need_weights)[0]
        return self.head(y.mean(1))


class ScaledWeight(nn.Module):
    """fc's weight enters a product only after aten.mul: its MACs cannot be attributed."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(x @ (self.fc.weight * 2).T)


class ViewedWeights(nn.Module):
    """Weights read through views: ``.t()`` into mm, ``.t().expand`` into bmm."""

    def __init__(self, d_in=4, d_out=3):
        super().__init__()
        self.fc = nn.Linear(d_in, d_out, bias=False)
        self.g = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x):  # x (B, T, d_in)
        a = x.flatten(0, 1) @ self.fc.weight.t()
        b = torch.bmm(x, self.g.weight.t().unsqueeze(0).expand(x.shape[0], -1, -1))
        return a.sum() + b.sum()


def flop_counter_macs(model, inputs, cm: CostModel) -> float:
    """MACs that FlopCounterMode attributes to the prunable modules (it counts 2 per MAC)."""
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    with FlopCounterMode(display=False) as fc:
        model(*inputs)
    counts = fc.get_flop_counts()
    total = 0
    for lay in cm.layers:
        key = f"{type(model).__name__}.{lay.name.rpartition('.')[0]}"
        assert key in counts, f"FlopCounterMode saw no FLOPs for {lay.name}"
        total += sum(counts[key].values())
    return total / 2


def total_macs(model, inputs) -> float:
    """Every MAC of one forward pass by FlopCounterMode, whatever module it is under."""
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    with FlopCounterMode(display=False) as fc:
        model(*inputs)
    return fc.get_total_flops() / 2


@pytest.mark.parametrize(
    "make,inputs",
    [
        (MLPNet, lambda: torch.randn(3, 1, 28, 28)),
        (resnet20, lambda: torch.randn(2, 3, 32, 32)),
        (lambda: mobilenet_v1(), lambda: torch.randn(1, 3, 224, 224)),
        (TinyTransformerBlock, lambda: torch.randn(2, 7, 32)),
        (Conv1d3dNet, lambda: (torch.randn(2, 4, 30), torch.randn(2, 2, 5, 8, 8))),
        (StridedGroupedCNN, lambda: torch.randn(3, 4, 11, 13)),
    ],
    ids=["mlp", "resnet20", "mobilenet_v1", "transformer", "conv1d_conv3d", "strided_grouped"],
)
def test_dense_macs_match_flop_counter(make, inputs):
    model = make().eval()
    x = inputs()
    cm = CostModel.from_model(model, x)
    batch = (x if isinstance(x, torch.Tensor) else x[0]).shape[0]
    expected = flop_counter_macs(model, x, cm) / batch
    assert cm.dense_macs == pytest.approx(expected, rel=1e-12)
    assert cm.excluded == []
    prunable = [(n, m) for n, m in model.named_modules()
                if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    assert [lay.name for lay in cm.layers] == [f"{n}.weight" for n, _ in prunable]
    assert cm.num_weights == sum(m.weight.numel() for _, m in prunable)


def test_resnet20_numbers():
    cm = CostModel.from_model(resnet20(), torch.randn(1, 3, 32, 32))
    assert cm.num_weights == 270_896
    assert cm.dense_macs == 40_813_184
    assert len(cm.layers) == 22


def test_layer_called_twice_counts_twice():
    cm = CostModel.from_model(Conv1d3dNet(), (torch.randn(1, 4, 30), torch.randn(1, 2, 5, 8, 8)))
    fc = next(lay for lay in cm.layers if lay.name == "fc.weight")
    assert fc.calls == 2 and fc.cost == 2


def test_conv_costs_are_output_positions_times_uses():
    x = torch.randn(2, 4, 11, 13)
    cm = CostModel.from_model(StridedGroupedCNN(), x)
    cost = {lay.name.removesuffix(".weight"): lay.cost for lay in cm.layers}
    # a: (11 + 4 - 2*2 - 1) // 2 + 1 = 6 rows, (13 + 4 - 4 - 1) // 2 + 1 = 7 columns
    assert cost["a"] == 6 * 7
    assert cost["dw"] == 6 * 7  # depthwise, same padding: every output position once
    assert cost["b"] == 6 * 4  # (3, 1) kernel, stride (1, 2): 6 rows, 4 columns
    assert cost["fc"] == 1


def test_depthwise_cost_is_output_positions():
    cm = CostModel.from_model(mobilenet_v1(), torch.randn(1, 3, 224, 224))
    dw = cm.layers[1]
    assert dw.kind == "Conv2d" and dw.shape == (32, 1, 3, 3)
    assert dw.cost == 112 * 112


def test_linear_on_sequences_costs_one_mac_per_token():
    cm = CostModel.from_model(TinyTransformerBlock(), torch.randn(2, 7, 32))
    assert {lay.name: lay.cost for lay in cm.layers} == dict.fromkeys(
        ("q.weight", "k.weight", "v.weight", "o.weight", "mlp1.weight", "mlp2.weight"), 7.0)


@pytest.mark.parametrize("need_weights", [False, True])
def test_multihead_attention_out_proj_is_counted(need_weights):
    tokens, d = 5, 16
    model = Attention(d, need_weights=need_weights).eval()
    x = torch.randn(2, tokens, d)
    cm = CostModel.from_model(model, x)
    out = next(lay for lay in cm.layers if lay.name == "attn.out_proj.weight")
    assert out.cost == tokens and out.calls == 1
    assert out.dense_macs == tokens * d * d
    qkv = next(lay for lay in cm.layers if lay.name == "attn.in_proj_weight")
    assert qkv.shape == (3 * d, d) and qkv.cost == tokens
    assert cm.dense_macs == 4 * tokens * d * d + d * 3
    assert cm.fixed_macs == 2 * tokens * tokens * d  # scores and their average of values
    assert cm.excluded == []


def test_weight_read_by_an_uncountable_op_is_excluded():
    cm = CostModel.from_model(ScaledWeight(), torch.randn(3, 4))
    assert [lay.name for lay in cm.layers] == ["head.weight"]
    assert [(e.name, e.kind, e.weights) for e in cm.excluded] == [("fc.weight", "Linear", 12)]
    assert "aten.mul" in cm.excluded[0].reason
    assert cm.num_weights == 6 and cm.dense_macs == 6


def test_weight_used_in_part_is_excluded():
    class Sliced(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.head = nn.Linear(2, 2)

        def forward(self, x):
            return self.head(F.linear(x, self.fc.weight[:2]))

    cm = CostModel.from_model(Sliced(), torch.randn(3, 4))
    assert [lay.name for lay in cm.layers] == ["head.weight"]
    assert [e.name for e in cm.excluded] == ["fc.weight"]
    assert "only part of it" in cm.excluded[0].reason


def test_weights_read_through_views_are_counted():
    tokens = 5
    model = ViewedWeights()
    x = torch.randn(2, tokens, 4)
    cm = CostModel.from_model(model, x)
    assert cm.excluded == []
    assert {lay.name: lay.cost for lay in cm.layers} == {"fc.weight": tokens, "g.weight": tokens}
    assert cm.dense_macs == pytest.approx(total_macs(model, x) / 2)  # per sample of 2


class Tied(nn.Module):
    """a and b share one weight (an alias, or a second Parameter over the same storage);
    c is an ordinary layer."""

    def __init__(self, alias=True):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.c = nn.Linear(4, 2)
        if alias:
            self.b.weight = self.a.weight
        else:
            self.b.weight = nn.Parameter(self.a.weight.data)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


def test_a_tied_weight_is_one_prunable_weight_costed_with_every_use():
    cm = CostModel.from_model(Tied(alias=True), torch.randn(2, 4))
    assert [lay.name for lay in cm.layers] == ["a.weight", "c.weight"]
    tied = cm.layers[0]
    assert tied.calls == 2 and tied.cost == 2  # used by a and by b
    assert [(m, a) for m, a in tied.holders] == [(cm.layers[0].module, "weight"),
                                                 (tied.aliases[0][0], "weight")]
    assert cm.num_weights == 16 + 8 and cm.excluded == []


def test_a_copy_sharing_storage_is_left_dense_and_named():
    cm = CostModel.from_model(Tied(alias=False), torch.randn(2, 4))
    assert [lay.name for lay in cm.layers] == ["c.weight"]
    assert sorted(e.name for e in cm.excluded) == ["a.weight", "b.weight"]
    assert all("shares its storage" in e.reason for e in cm.excluded)


def test_a_model_whose_only_layers_share_storage_is_refused_with_the_reason():
    class OnlyShared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = nn.Parameter(self.a.weight.data)

        def forward(self, x):
            return self.b(self.a(x))

    with pytest.raises(ModelError, match="shares its storage"):
        CostModel.from_model(OnlyShared(), torch.randn(2, 4))


def test_channels_last_weights_are_counted_like_contiguous_ones():
    dense = CostModel.from_model(resnet20().eval(), torch.randn(1, 3, 32, 32))
    cl = resnet20().eval().to(memory_format=torch.channels_last)
    cm = CostModel.from_model(cl, torch.randn(1, 3, 32, 32))
    assert cm.excluded == [] and cm.dense_macs == dense.dense_macs


def test_a_product_of_two_prunable_weights_is_excluded():
    class Factored(nn.Module):
        def __init__(self):
            super().__init__()
            self.u = nn.Linear(8, 4, bias=False)  # weight (4, 8)
            self.v = nn.Linear(4, 8, bias=False)  # weight (8, 4)
            self.out = nn.Linear(4, 3)

        def forward(self, x):
            return self.out(F.linear(x, self.u.weight @ self.v.weight))

    cm = CostModel.from_model(Factored(), torch.randn(4, 4))
    assert [lay.name for lay in cm.layers] == ["out.weight"]
    assert all("another prunable weight" in e.reason for e in cm.excluded)


def test_meta_device_model_is_refused():
    with torch.device("meta"):
        model = SmallCNN()
    with pytest.raises(ModelError, match="meta device"):
        CostModel.from_model(model, torch.randn(1, 1, 8, 8))


def test_masked_weights_are_refused():
    model = SmallCNN()
    torch_prune.l1_unstructured(model.c2, "weight", amount=0.5)
    with pytest.raises(ModelError, match="make_permanent"):
        CostModel.from_model(model, torch.randn(1, 1, 8, 8))


def test_probe_restores_mode_and_requires_grad():
    model = SmallCNN().train()
    model.c1.weight.requires_grad_(False)
    CostModel.from_model(model, torch.randn(1, 1, 8, 8))
    assert model.training and not model.c1.weight.requires_grad
    assert model.c2.weight.requires_grad


def test_no_prunable_layers():
    with pytest.raises(ModelError, match="no prunable parameters"):
        CostModel.from_model(nn.Sequential(nn.ReLU()), torch.randn(1, 3))


def test_only_uncountable_layers_names_them():
    class OnlyScaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return x @ (self.fc.weight * 2).T

    with pytest.raises(ModelError, match=r"left out: fc.weight \(read by aten.mul"):
        CostModel.from_model(OnlyScaled(), torch.randn(2, 4))


def test_flat_order_split_and_mask_costs():
    cm = CostModel.from_model(SmallCNN(), torch.randn(2, 1, 8, 8))
    assert [lay.name for lay in cm.layers] == ["c1.weight", "c2.weight", "fc.weight"]
    assert cm.offsets == [0, 54, 54 + 432, 54 + 432 + 32]
    assert cm.layer_costs().tolist() == [64.0, 16.0, 1.0]  # 8x8, 4x4 outputs, one vector
    f = cm.per_weight_costs()
    assert f.shape == (cm.num_weights,) and f[0] == 64 and f[54] == 16 and f[-1] == 1
    mask = torch.zeros(cm.num_weights, dtype=torch.bool)
    mask[:10] = True
    mask[-3:] = True
    assert cm.macs_of_mask(mask) == 10 * 64 + 3 * 1
    parts = cm.split(torch.arange(cm.num_weights))
    assert [tuple(p.shape) for p in parts] == [(6, 1, 3, 3), (8, 6, 3, 3), (4, 8)]
    assert int(parts[1].reshape(-1)[0]) == 54


# -- the MAC registry and the recount agree ------------------------------------------------------
def _examples():
    """One call of every operation in the cost model's MAC registry (several shapes of the
    convolutions), as zero-argument functions."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    aten = torch.ops.aten
    return [
        (aten.mm, lambda: torch.mm(r(3, 5), r(5, 7))),
        (aten.addmm, lambda: torch.addmm(r(7), r(3, 5), r(5, 7))),
        (aten.bmm, lambda: torch.bmm(r(2, 3, 5), r(2, 5, 7))),
        (aten.baddbmm, lambda: torch.baddbmm(r(2, 3, 7), r(2, 3, 5), r(2, 5, 7))),
        (aten.convolution, lambda: F.conv2d(r(2, 4, 9, 9), r(6, 4, 3, 3), stride=2)),
        (aten.convolution, lambda: F.conv2d(r(2, 4, 9, 9), r(8, 2, 3, 3), groups=2)),
        (aten.convolution, lambda: F.conv1d(r(2, 3, 11), r(5, 3, 4), padding=1)),
        (aten.convolution, lambda: F.conv3d(r(1, 2, 5, 5, 5), r(3, 2, 2, 2, 2))),
        (aten.convolution, lambda: F.conv_transpose2d(r(2, 4, 5, 5), r(4, 3, 3, 3), stride=2)),
        (aten._convolution, lambda: aten._convolution(
            r(2, 4, 7, 7), r(6, 4, 3, 3), None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
            False, False, True, True)),
    ]


class _Calls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.seen.append((func, args, out))
        return out


def test_every_mac_formula_of_the_cost_model_counts_as_the_recount_does():
    """Each operation the cost model has a formula for gives the MACs that
    torch.utils.flop_counter (the recount's registry) gives, and every one has an example
    here: an operation added to the registry without one fails this test."""
    from falcon_prune.analysis.macs import LOOKUPS, MAC_FORMULAS, macs_of

    examples = _examples()
    assert {op for op, _ in examples} == set(MAC_FORMULAS) - LOOKUPS
    for op, call in examples:
        with FlopCounterMode(display=False) as counter, _Calls() as calls:
            call()
        ours = [macs_of(f, a, o) for f, a, o in calls.seen if f.overloadpacket is op]
        assert len(ours) == 1, op
        assert ours[0] == counter.get_total_flops() / 2, op


def test_an_operation_the_recount_cannot_count_is_refused():
    from falcon_prune.analysis.macs import register_macs

    with pytest.raises(ConfigError, match="no FLOP formula in torch.utils.flop_counter"):
        register_macs(torch.ops.aten.dot, lambda args, out: args[0].shape[0])
    with pytest.raises(fp.errors.ConfigTypeError, match="aten operation"):
        register_macs("mm", lambda args, out: 0)
