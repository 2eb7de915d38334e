"""The cost model sees every use of every weight: dense totals against FlopCounterMode, the
prunable set (recurrent, transposed convolutions, attention projections, HuggingFace's
Conv1D, tied weights, include/exclude, register_prunable), fixed MACs and flops_of, and
prune's FLOP fraction equal to an independent recount on each model."""

import pytest
import torch
from helpers import TinyAttention, TinyEncoder
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import falcon_prune as fp
from falcon_prune.analysis.costs import CostModel, plain_kernels
from falcon_prune.analysis.prunable import register_prunable
from falcon_prune.errors import BudgetError


def total_macs(model, x):
    """Every MAC of the network by torch.utils.flop_counter (math attention, no oneDNN
    recurrent kernel, so that the operations are the plain ones)."""
    with torch.enable_grad(), plain_kernels(model), FlopCounterMode(display=False) as f:
        model(*x) if isinstance(x, tuple) else model(x)
    return f.get_total_flops() / 2


class MLP(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(6, 8, 3, stride=2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))


class Recurrent(nn.Module):
    def __init__(self, kind=nn.LSTM):
        super().__init__()
        self.rnn = kind(8, 12, num_layers=2, batch_first=True)
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        return self.fc(self.rnn(x)[0][:, -1])


class UNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.out = nn.Conv2d(5, 2, 1)

    def forward(self, x):
        h = self.up(torch.relu(self.mid(torch.relu(self.down(x)))))
        return self.out(torch.cat([h, x], 1))


MODELS = {
    "mlp": (MLP, (1, 8, 8)), "cnn": (CNN, (1, 8, 8)), "attention": (TinyAttention, (5, 8)),
    "encoder": (TinyEncoder, (5, 8)), "lstm": (Recurrent, (6, 8)),
    "gru": (lambda: Recurrent(nn.GRU), (6, 8)), "unet": (UNet, (1, 8, 8)),
}


def build(name):
    """(the model MODELS[name] from seed 0 in eval mode, its input shape)."""
    make, shape = MODELS[name]
    torch.manual_seed(0)
    return make().eval(), shape


@pytest.mark.parametrize("name", MODELS)
def test_dense_totals_match_flop_counter(name):
    model, shape = build(name)
    x = torch.randn(2, *shape)
    cm = CostModel.from_model(model, x)
    assert cm.excluded == []
    assert cm.dense_macs + cm.fixed_macs == pytest.approx(total_macs(model, x) / 2)


def test_the_prunable_set():
    names = lambda m, shape: [lay.name for lay in CostModel.from_model(  # noqa: E731
        m.eval(), torch.randn(2, *shape)).layers]
    assert "mha.in_proj_weight" in names(TinyAttention(), (5, 8))
    assert "mha.out_proj.weight" in names(TinyAttention(), (5, 8))
    lstm = names(Recurrent(), (6, 8))
    assert {"rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.weight_ih_l1"} <= set(lstm)
    assert "up.weight" in names(UNet(), (1, 8, 8))
    emb = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2))
    x = torch.randint(0, 10, (2, 3))
    assert [lay.name for lay in CostModel.from_model(emb, x).layers] == ["2.weight"]
    with_emb = CostModel.from_model(emb, x, include="0.weight")
    assert {lay.name: lay.cost for lay in with_emb.layers}["0.weight"] == 0  # lookups: free
    cnn = CNN().eval()
    kept = CostModel.from_model(cnn, torch.randn(2, 1, 8, 8), exclude=["c1", nn.Linear])
    assert [lay.name for lay in kept.layers] == ["c2.weight"]
    pred = CostModel.from_model(cnn, torch.randn(2, 1, 8, 8),
                                exclude=lambda name, module: name.startswith("c2"))
    assert [lay.name for lay in pred.layers] == ["c1.weight", "fc.weight"]


def test_register_prunable_adds_a_layer_type():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.kernel = nn.Parameter(torch.randn(6, 8))

        def forward(self, x):
            return x @ self.kernel.T

    model = nn.Sequential(Scaled(), nn.ReLU(), nn.Linear(6, 2))
    x = torch.randn(3, 8)
    assert [lay.name for lay in CostModel.from_model(model, x).layers] == ["2.weight"]
    register_prunable(Scaled, ("kernel",))
    try:
        cm = CostModel.from_model(model, x)
        assert {lay.name: lay.cost for lay in cm.layers} == {"0.kernel": 1, "2.weight": 1}
    finally:
        fp.analysis.prunable.PRUNABLE.pop(Scaled)


def test_a_tied_weight_is_one_prunable_weight_with_every_use():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 6, bias=False), nn.Linear(6, 6, bias=False)
            self.b.weight = self.a.weight
            self.out = nn.Linear(6, 3)

        def forward(self, x):
            return self.out(self.b(torch.relu(self.a(x))))

    torch.manual_seed(0)
    model = Tied().eval()
    x, y = torch.randn(120, 6), torch.randint(0, 3, (120,))
    cm = CostModel.from_model(model, x[:2])
    assert [lay.name for lay in cm.layers] == ["a.weight", "out.weight"]
    assert cm.layers[0].cost == 2  # used twice per sample, counted once in NNZ
    r = fp.prune(model, (x, y), flops=0.5, n_gradients=40, n_validation=40, progress=False)
    assert r.model.a.weight_orig is r.model.b.weight_orig  # still tied while masked
    plain = fp.make_permanent(fp.clone_model(r.model))
    assert plain.a.weight is plain.b.weight  # and after folding the masks
    kept, dense = fp.count_macs(r.model, x[:1])
    assert r.flops_fraction == pytest.approx(kept / dense) and r.flops_fraction <= 0.5


def test_fixed_macs_and_flops_of_model():
    torch.manual_seed(0)
    model = TinyAttention().eval()
    x, y = torch.randn(150, 5, 8), torch.randint(0, 3, (150,))
    cm = CostModel.from_model(model, x[:2])
    assert cm.fixed_macs == 2 * 2 * 5 * 5 * 8  # QKᵀ and AV of two heads of 8 dimensions
    kw = dict(n_gradients=40, n_validation=40, progress=False)
    r = fp.prune(model, (x, y), flops=0.5, flops_of="model", **kw)
    total = cm.dense_macs + cm.fixed_macs
    assert r.flops_fraction <= 0.5 and r.fixed_macs == cm.fixed_macs
    kept = r.flops_fraction * total - cm.fixed_macs
    assert kept <= 0.5 * total - cm.fixed_macs + 1e-6
    assert "fixed" in r.table()
    least = cm.fixed_macs / total
    with pytest.raises(BudgetError, match="below its fixed part"):
        fp.prune(model, (x, y), flops=least * 0.9, flops_of="model", **kw)


@pytest.mark.parametrize("name", MODELS)
def test_prune_fraction_equals_an_independent_recount(name):
    model, shape = build(name)
    x = torch.randn(120, *shape)
    out = model(x[:1])
    task = "regression" if name == "unet" else "classification"
    y = torch.randn(120, *out.shape[1:]) if name == "unet" else torch.randint(0, 3, (120,))
    r = fp.prune(model, (x, y), flops=0.4, task=task, n_gradients=40, n_validation=40,
                 progress=False)
    with torch.enable_grad(), plain_kernels(model):
        kept, dense = fp.count_macs(r.model, x[:1])
    assert r.flops_fraction == pytest.approx(kept / dense) and r.flops_fraction <= 0.4
    assert r.details["gradients"] == "torch.func.vmap"  # no per-row fallback


def test_recurrent_and_attention_gradients_are_batched_by_vmap(recwarn):
    """Math attention and plain recurrent kernels while taking gradients: vmap has a
    batching rule for every operation, so it does not fall back to a per-sample loop
    (it warns when it does)."""
    for make, shape in (MODELS["lstm"], MODELS["encoder"]):
        torch.manual_seed(0)
        model = make().eval()
        x, y = torch.randn(80, *shape), torch.randint(0, 3, (80,))
        fp.prune(model, (x, y), flops=0.5, n_gradients=40, n_validation=40, progress=False)
    assert not [w for w in recwarn if "fallback" in str(w.message).lower()]
