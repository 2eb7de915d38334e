"""The layer-wise loss model: each linear layer's input Gram, gathered block by block.

Where the global loss model needs a gradient matrix of n rows by p weights, the layer-wise
one needs, for every prunable linear layer ``y = W x``, the Gram of its inputs over the
calibration tokens, H = (1/N) Σ_t x_t x_tᵀ (d x d, whatever the number of tokens): the
reconstruction error tr((W - Ŵ) H (W - Ŵ)ᵀ) of pruned weights Ŵ is then known exactly.
:class:`Grams` gathers them with forward hooks while a block runs; each batch's product is
formed in float32 and added to float64 sums. Layers fed the same tensor (a transformer's
query, key and value projections) share one sum. Under ``torch.distributed`` every process
gathers the Grams of its share of the sequences and :meth:`Grams.reduce` sums them.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from falcon_prune.loss.distributed import Ranks


def layer_input(module: nn.Module, args: tuple) -> torch.Tensor:
    """The input rows of a linear layer's call: (tokens, d)."""
    x = args[0]
    return x.reshape(-1, x.shape[-1])


class Grams:
    """Input Grams of the linear layers ``layers`` {name: module} (their weights (r, d)
    read x of width d)."""

    def __init__(self, layers: dict[str, nn.Module]):
        self.layers = layers
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = dict.fromkeys(layers, 0)
        self.shared: dict[str, str] = {}  # layer -> the layer whose sum it shares
        self._last: dict[str, weakref.ref] = {}  # layer -> its last input tensor

    def _same(self, other: str, x: torch.Tensor) -> bool:
        ref = self._last.get(other)
        return ref is not None and ref() is x

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, out: object) -> None:
            leader = next((o for o in self._last if o != name and o not in self.shared
                           and self._same(o, args[0])), None)
            self._last[name] = weakref.ref(args[0])
            if leader is not None:  # the very same tensor: one sum serves both
                self.shared[name] = leader
                return
            self.shared.pop(name, None)
            x = layer_input(module, args).detach()
            xf = x if x.dtype == torch.float64 else x.float()
            product = (xf.T @ xf).double()
            if name in self.sums:
                self.sums[name] += product
            else:
                self.sums[name] = product
            self.tokens[name] += x.shape[0]
        return hook

    @contextmanager
    def attached(self) -> Iterator[Grams]:
        """Within the block, every forward of the layers adds to their Grams."""
        handles = [m.register_forward_hook(self._hook(n)) for n, m in self.layers.items()]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self._last.clear()

    def reduce(self, ranks: Ranks) -> None:
        """Sum every process's Grams and token counts (no-op in one process). Each layer's
        sum is reduced on its own, so that processes that saw no tokens, or shared
        differently, take part alike; the input width d comes from the processes that saw
        tokens (whatever the layout of the layer's weight: (r, d) or HuggingFace Conv1D's
        (d, r))."""
        if not ranks.active:
            return
        names = sorted(self.layers)
        owners = [self.shared.get(name, name) for name in names]
        widths = ranks.all_max(torch.tensor(
            [0.0 if self.sums.get(o) is None else float(self.sums[o].shape[0])
             for o in owners], dtype=torch.float64)).long().tolist()
        for name, owner, d in zip(names, owners, widths, strict=True):
            local = self.sums.get(owner)
            local = torch.zeros((d, d), dtype=torch.float64) if local is None else local
            count = torch.tensor([float(self.tokens[owner])], dtype=torch.float64)
            self.sums[name] = ranks.all_sum(local.clone())
            self.tokens[name] = int(ranks.all_sum(count).item())
        self.shared.clear()

    def gram(self, name: str) -> torch.Tensor:
        """H (d, d) float64 of layer ``name``: the mean of x xᵀ over its tokens."""
        owner = self.shared.get(name, name)
        return self.sums[owner] / max(1, self.tokens[owner])

    def clear(self) -> None:
        self.sums.clear()
        self.tokens = dict.fromkeys(self.layers, 0)
        self.shared.clear()
