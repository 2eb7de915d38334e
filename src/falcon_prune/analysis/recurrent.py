"""Recurrent layers (``nn.RNN``, ``nn.LSTM``, ``nn.GRU``) unrolled into matrix products.

PyTorch runs a recurrent layer on the CPU as one fused kernel (oneDNN's, or the native
one, which writes its hidden state in place). ``torch.func.vmap`` has no batching rule for
the first and cannot batch the in-place writes of the second, so per-sample gradients
through either fall back to a slow loop or fail. While gradients are taken,
:func:`unrolled_recurrent` replaces each recurrent layer's ``forward`` by the same
equations written as ``F.linear`` calls and element-wise gates, one time step at a time:
the same outputs to float rounding, and operations that vmap batches. The input projection
of every time step is one product, so the unrolled layer costs the MACs of the fused one.

Packed sequences are not unrolled: a layer given one runs its own ``forward`` (and vmap
then falls back, see :mod:`falcon_prune.loss.gradients`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence


def _weights(rnn: nn.RNNBase, layer: int, reverse: bool) -> tuple:
    """(w_ih, w_hh, b_ih, b_hh, w_hr) of one layer and direction (biases/projection may be
    None), read at call time so that ``functional_call``'s substitutes are used."""
    sfx = f"_l{layer}{'_reverse' if reverse else ''}"
    get = lambda kind: getattr(rnn, f"{kind}{sfx}", None)  # noqa: E731
    b_ih, b_hh = (get("bias_ih"), get("bias_hh")) if rnn.bias else (None, None)
    return get("weight_ih"), get("weight_hh"), b_ih, b_hh, get("weight_hr")


def _step(rnn: nn.RNNBase, x_proj: torch.Tensor, state: tuple, w_hh, b_hh, w_hr) -> tuple:
    """One time step: ``x_proj`` (B, G) is the input's projection with its bias; ``state``
    is (h,) or (h, c) for an LSTM, each (B, H); returns the new state."""
    h = state[0]
    hp = F.linear(h, w_hh, b_hh)
    if rnn.mode == "LSTM":
        i, f, g, o = (x_proj + hp).chunk(4, -1)
        c = torch.sigmoid(f) * state[1] + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return (h if w_hr is None else F.linear(h, w_hr), c)
    if rnn.mode == "GRU":
        xr, xz, xn = x_proj.chunk(3, -1)
        hr, hz, hn = hp.chunk(3, -1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return ((1 - z) * n + z * h,)
    act = torch.tanh if rnn.mode == "RNN_TANH" else torch.relu
    return (act(x_proj + hp),)


def _direction(rnn: nn.RNNBase, x: torch.Tensor, state: tuple, layer: int,
               reverse: bool) -> tuple[torch.Tensor, tuple]:
    """Run one layer in one direction over ``x`` (T, B, I); returns (T, B, H_out) outputs
    and the final state."""
    w_ih, w_hh, b_ih, b_hh, w_hr = _weights(rnn, layer, reverse)
    proj = F.linear(x, w_ih, b_ih)  # every time step's input projection at once
    outs = []
    steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
    for t in steps:
        state = _step(rnn, proj[t], state, w_hh, b_hh, w_hr)
        outs.append(state[0])
    if reverse:
        outs.reverse()
    return torch.stack(outs), state


def _initial(rnn: nn.RNNBase, x: torch.Tensor, hx: object) -> tuple:
    """(h0,) or (h0, c0), each (layers * directions, B, H): the given state or zeros."""
    dirs = 2 if rnn.bidirectional else 1
    h_size = rnn.proj_size if getattr(rnn, "proj_size", 0) else rnn.hidden_size
    if hx is None:
        zeros = lambda size: x.new_zeros(rnn.num_layers * dirs, x.shape[1], size)  # noqa: E731
        return (zeros(h_size), zeros(rnn.hidden_size)) if rnn.mode == "LSTM" else (zeros(h_size),)
    return tuple(hx) if rnn.mode == "LSTM" else (hx,)


def unrolled_forward(rnn: nn.RNNBase, x: torch.Tensor, hx: object = None) -> tuple:
    """``rnn(x, hx)`` computed step by step (see the module docstring); same signature and
    return value as ``nn.RNN/LSTM/GRU.forward`` for tensor inputs, batched or not."""
    unbatched = x.dim() == 2
    if unbatched:
        x = x.unsqueeze(1)
        hx = None if hx is None else (
            tuple(t.unsqueeze(1) for t in hx) if rnn.mode == "LSTM" else hx.unsqueeze(1))
    elif rnn.batch_first:
        x = x.transpose(0, 1)
    state0 = _initial(rnn, x, hx)
    dirs = 2 if rnn.bidirectional else 1
    finals = []
    for layer in range(rnn.num_layers):
        outs = []
        for d in range(dirs):
            k = layer * dirs + d
            out, state = _direction(rnn, x, tuple(s[k] for s in state0), layer, d == 1)
            outs.append(out)
            finals.append(state)
        x = torch.cat(outs, -1) if dirs == 2 else outs[0]
        if rnn.dropout and rnn.training and layer < rnn.num_layers - 1:
            x = F.dropout(x, rnn.dropout, training=True)
    final = tuple(torch.stack([f[j] for f in finals]) for j in range(len(state0)))
    if unbatched:
        x, final = x.squeeze(1), tuple(s.squeeze(1) for s in final)
    elif rnn.batch_first:
        x = x.transpose(0, 1)
    return x, (final if rnn.mode == "LSTM" else final[0])


@contextmanager
def unrolled_recurrent(model: nn.Module) -> Iterator[None]:
    """Within the block, every ``nn.RNN/LSTM/GRU`` of ``model`` runs unrolled (tensor
    inputs; a packed sequence runs the layer's own forward). The layers' ``forward`` is
    restored on exit."""
    layers = [m for m in model.modules() if isinstance(m, nn.RNNBase)]
    own = [m.__dict__.get("forward") for m in layers]
    for m in layers:
        fused = m.forward

        def forward(x, hx=None, m=m, fused=fused):
            if isinstance(x, PackedSequence):
                return fused(x, hx)
            return unrolled_forward(m, x, hx)

        m.forward = forward
    try:
        yield
    finally:
        for m, f in zip(layers, own, strict=True):
            if f is None:
                del m.forward
            else:
                m.forward = f
