import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from falcon_prune.costs import CostModel, count_macs
from falcon_prune.models import MLPNet, mobilenet_v1, resnet20


class TinyTransformerBlock(nn.Module):
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
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 8, 5, stride=2, padding=1, dilation=2)
        self.c3 = nn.Conv3d(2, 6, 3, stride=(1, 2, 2), padding=1, groups=2)
        self.fc = nn.Linear(8, 3)

    def forward(self, x1, x3):
        a = self.c1(x1).mean(-1)
        b = self.c3(x3).mean((2, 3, 4))
        return self.fc(a) + self.fc(a) + b[:, :3]  # fc called twice


def flop_counter_macs(model, inputs, cm: CostModel) -> float:
    """MACs that FlopCounterMode attributes to the prunable modules (it counts 2 per MAC)."""
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    with FlopCounterMode(display=False) as fc:
        model(*inputs)
    counts = fc.get_flop_counts()
    total = 0
    for lay in cm.layers:
        key = f"{type(model).__name__}.{lay.name}"
        assert key in counts, f"FlopCounterMode saw no FLOPs for {lay.name}"
        total += sum(counts[key].values())
    return total / 2


@pytest.mark.parametrize(
    "make,inputs",
    [
        (MLPNet, lambda: torch.randn(3, 1, 28, 28)),
        (resnet20, lambda: torch.randn(2, 3, 32, 32)),
        (lambda: mobilenet_v1(), lambda: torch.randn(1, 3, 224, 224)),
        (TinyTransformerBlock, lambda: torch.randn(2, 7, 32)),
        (Conv1d3dNet, lambda: (torch.randn(2, 4, 30), torch.randn(2, 2, 5, 8, 8))),
    ],
)
def test_dense_macs_match_flop_counter(make, inputs):
    model = make().eval()
    x = inputs()
    cm = CostModel.from_model(model, x)
    batch = (x if isinstance(x, torch.Tensor) else x[0]).shape[0]
    expected = flop_counter_macs(model, x, cm) / batch
    assert cm.dense_macs == pytest.approx(expected, rel=1e-12)
    assert cm.num_weights == sum(lay.numel for lay in cm.layers)


def test_resnet20_numbers():
    cm = CostModel.from_model(resnet20(), torch.randn(1, 3, 32, 32))
    assert cm.num_weights == 270_896
    assert cm.dense_macs == 40_813_184
    assert len(cm.layers) == 22


def test_layer_called_twice_counts_twice():
    cm = CostModel.from_model(Conv1d3dNet(), (torch.randn(1, 4, 30), torch.randn(1, 2, 5, 8, 8)))
    fc = next(lay for lay in cm.layers if lay.name == "fc")
    assert fc.calls == 2 and fc.cost == 2


def test_depthwise_cost_is_output_positions():
    cm = CostModel.from_model(mobilenet_v1(), torch.randn(1, 3, 224, 224))
    dw = cm.layers[1]
    assert dw.kind == "Conv2d" and dw.shape == (32, 1, 3, 3)
    assert dw.cost == 112 * 112


def test_count_macs_of_pruned_model():
    model = MLPNet()
    with torch.no_grad():
        model.fc1.weight[:, :392] = 0
    kept, dense = count_macs(model, torch.randn(1, 784))
    assert dense == 784 * 40 + 40 * 20 + 20 * 10
    assert kept == dense - 392 * 40


def test_no_prunable_layers():
    with pytest.raises(ValueError, match="no prunable layers"):
        CostModel.from_model(nn.Sequential(nn.ReLU()), torch.randn(1, 3))
