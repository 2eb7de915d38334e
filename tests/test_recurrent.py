"""Recurrent layers unrolled for per-sample gradients: same outputs as PyTorch's kernels,
gradients equal to a plain backward pass, and batched by vmap without its slow loop."""

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from falcon_prune.analysis.recurrent import unrolled_forward, unrolled_recurrent

CASES = {
    "lstm": lambda: nn.LSTM(5, 7, num_layers=2),
    "lstm_batch_first_bidirectional": lambda: nn.LSTM(5, 7, batch_first=True,
                                                      bidirectional=True),
    "lstm_projection": lambda: nn.LSTM(5, 7, num_layers=2, proj_size=3, batch_first=True),
    "gru": lambda: nn.GRU(5, 7, num_layers=2, bidirectional=True),
    "gru_no_bias": lambda: nn.GRU(5, 7, bias=False, batch_first=True),
    "rnn_relu": lambda: nn.RNN(5, 7, nonlinearity="relu", batch_first=True),
    "rnn_tanh": lambda: nn.RNN(5, 7, num_layers=3),
}


def flat(out):
    return torch.cat([t.reshape(-1) for t in
                      (out if isinstance(out, tuple) else (out,)) for t in
                      (t if isinstance(t, tuple) else (t,))])


@pytest.mark.parametrize("name", CASES)
def test_unrolled_outputs_equal_the_fused_kernels(name):
    torch.manual_seed(0)
    rnn = CASES[name]().double().eval()
    x = torch.randn(3, 4, 5, dtype=torch.float64)  # (T, B, I) or (B, T, I)
    expected = rnn(x)
    got = unrolled_forward(rnn, x)
    assert type(got[1]) is type(expected[1])
    assert torch.allclose(flat(got), flat(expected), atol=1e-12)
    unbatched = x[:, 0] if not rnn.batch_first else x[0]
    assert torch.allclose(flat(unrolled_forward(rnn, unbatched)), flat(rnn(unbatched)),
                          atol=1e-12)


def test_a_given_initial_state_is_used():
    torch.manual_seed(0)
    rnn = nn.LSTM(5, 7, num_layers=2).double()
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    hx = (torch.randn(2, 4, 7, dtype=torch.float64), torch.randn(2, 4, 7, dtype=torch.float64))
    assert torch.allclose(flat(unrolled_forward(rnn, x, hx)), flat(rnn(x, hx)), atol=1e-12)


class Tagger(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.rnn = kind(6, 8, num_layers=2, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU])
def test_per_sample_gradients_are_batched_and_equal_a_plain_backward(kind):
    torch.manual_seed(0)
    model = Tagger(kind).eval()
    x, y = torch.randn(6, 5, 6), torch.randint(0, 3, (6,))
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0))

    with unrolled_recurrent(model), warnings.catch_warnings():
        warnings.simplefilter("error")  # vmap warns when it falls back to a loop
        rows = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    assert "forward" not in model.rnn.__dict__  # restored
    for i in range(6):
        model.zero_grad()
        loss(dict(model.named_parameters()), x[i], y[i]).backward()
        for k, p in model.named_parameters():
            assert torch.allclose(rows[k][i], p.grad, atol=1e-5), k


def test_packed_sequences_run_the_layer_own_forward():
    rnn = nn.GRU(3, 4)
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(5, 2, 3), [5, 3])
    with unrolled_recurrent(rnn):
        out, h = rnn(packed)
    assert isinstance(out, nn.utils.rnn.PackedSequence) and h.shape == (1, 2, 4)
