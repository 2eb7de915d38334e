"""FLOP cost model: the per-weight multiply-accumulate cost of every prunable weight.

A *prunable weight* is an entry of the ``weight`` tensor of a ``Conv1d``/``Conv2d``/``Conv3d``
or ``Linear`` module. Its cost ``f_i`` is the number of multiply-accumulates (MACs) it takes
part in for one input sample: the number of output positions of a convolution (stride,
padding and dilation included; groups do not change it), the number of tokens a ``Linear``
is applied to, summed over every call of the module in one forward pass. Everything is read
off one forward pass with hooks; no per-architecture tables.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class PrunableLayer:
    """One prunable weight tensor.

    ``cost`` is the MACs per weight per input sample (the same for every weight of the layer),
    ``calls`` how many times the module ran in the probing forward pass.
    """

    name: str
    module: nn.Module = field(repr=False, compare=False)
    kind: str
    shape: tuple[int, ...]
    cost: float
    calls: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def dense_macs(self) -> float:
        return self.numel * self.cost


def find_prunable_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """All (qualified name, module) pairs of prunable layers, in registration order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)]


def _batch_size(example_input: torch.Tensor | Sequence[torch.Tensor]) -> int:
    first = example_input if isinstance(example_input, torch.Tensor) else example_input[0]
    if not isinstance(first, torch.Tensor) or first.dim() == 0:
        raise TypeError(
            "example_input must be a batched tensor (or a tuple of tensors whose first one is "
            f"batched); got {type(first).__name__}. Pass e.g. a batch of one input: x[:1]."
        )
    return int(first.shape[0])


def _call_cost(module: nn.Module, output: torch.Tensor, batch: int) -> float:
    """MACs per weight for one call of ``module`` that produced ``output`` (per sample)."""
    if isinstance(module, nn.Linear):
        tokens = output.numel() // module.out_features
        return tokens / batch
    spatial_dims = module.weight.dim() - 2
    if output.dim() == spatial_dims + 1:  # unbatched convolution input (C, *spatial)
        return float(math.prod(output.shape[1:]))
    return math.prod(output.shape[2:]) * output.shape[0] / batch


class CostModel:
    """Per-layer FLOP costs of a model's prunable weights, derived from one forward pass.

    Weights are ordered layer by layer (registration order), each layer flattened in
    row-major order: this is the order of every flat weight vector in the library.
    """

    def __init__(self, layers: list[PrunableLayer]):
        if not layers:
            raise ValueError(
                "the model has no prunable layers (Conv1d/Conv2d/Conv3d/Linear weights); "
                "falcon-prune can only prune those."
            )
        self.layers = layers
        sizes = [lay.numel for lay in layers]
        self.offsets = [0]
        for s in sizes:
            self.offsets.append(self.offsets[-1] + s)

    @classmethod
    def from_model(
        cls, model: nn.Module, example_input: torch.Tensor | Sequence[torch.Tensor]
    ) -> CostModel:
        """Probe ``model`` with ``example_input`` (a batch) and record every layer's cost.

        Layers that never run in the forward pass get cost 0 and a warning-free entry; they
        are still pruned by sparsity budgets but cost no FLOPs.
        """
        modules = find_prunable_modules(model)
        if not modules:
            raise ValueError(
                f"{type(model).__name__} has no prunable layers (Conv1d/Conv2d/Conv3d/Linear); "
                "nothing to prune."
            )
        batch = _batch_size(example_input)
        costs = {name: 0.0 for name, _ in modules}
        calls = {name: 0 for name, _ in modules}
        handles = []
        for name, mod in modules:

            def hook(m, inp, out, name=name):
                costs[name] += _call_cost(m, out, batch)
                calls[name] += 1

            handles.append(mod.register_forward_hook(hook))
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                if isinstance(example_input, torch.Tensor):
                    model(example_input)
                else:
                    model(*example_input)
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        layers = [
            PrunableLayer(
                name=name,
                module=mod,
                kind=type(mod).__name__,
                shape=tuple(mod.weight.shape),
                cost=costs[name],
                calls=calls[name],
            )
            for name, mod in modules
        ]
        return cls(layers)

    @property
    def num_weights(self) -> int:
        """p: the number of prunable weights."""
        return self.offsets[-1]

    @property
    def dense_macs(self) -> float:
        """F_dense: multiply-accumulates of all prunable weights for one input sample."""
        return sum(lay.dense_macs for lay in self.layers)

    def layer_costs(self) -> torch.Tensor:
        """(L,) float64: the per-weight cost of each layer."""
        return torch.tensor([lay.cost for lay in self.layers], dtype=torch.float64)

    def layer_sizes(self) -> torch.Tensor:
        """(L,) int64: the number of weights in each layer."""
        return torch.tensor([lay.numel for lay in self.layers], dtype=torch.int64)

    def per_weight_costs(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(p,) float64: f_i for every prunable weight, in the library's flat order."""
        return torch.repeat_interleave(self.layer_costs(), self.layer_sizes()).to(device)

    def macs_of_mask(self, mask: torch.Tensor) -> float:
        """Kept MACs per sample of a flat (p,) 0/1 or boolean mask, summed per layer."""
        total = 0.0
        for lay, a, b in zip(self.layers, self.offsets[:-1], self.offsets[1:], strict=True):
            total += lay.cost * int(mask[a:b].count_nonzero())
        return total

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Split a flat (p,) vector into per-layer tensors of the weights' shapes (views)."""
        return [
            flat[a:b].view(lay.shape)
            for lay, a, b in zip(self.layers, self.offsets[:-1], self.offsets[1:], strict=True)
        ]


def flatten_weights(cost_model: CostModel, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(p,) vector of the current prunable weights (masked ones included as their value)."""
    return torch.cat(
        [lay.module.weight.detach().reshape(-1).to(dtype) for lay in cost_model.layers]
    )


def count_macs(model: nn.Module, example_input: torch.Tensor) -> tuple[float, float]:
    """(kept, dense) MACs per sample of the prunable layers of ``model``, counting a weight
    as kept when it is non-zero. An independent recount used to check every result."""
    cm = CostModel.from_model(model, example_input)
    kept = 0.0
    for lay in cm.layers:
        kept += lay.cost * int(lay.module.weight.detach().count_nonzero())
    return kept, cm.dense_macs
