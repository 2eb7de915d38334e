"""An independent recount of a network's multiply-accumulates, kept and dense.

Every pruning result is checked against its budgets by this recount before it is returned.
It shares nothing with the cost model (:mod:`falcon_prune.analysis.costs`) but the definition of
which weights are prunable: it runs the network under ``torch.utils.flop_counter``'s
``FlopCounterMode`` and takes each operation's FLOPs from PyTorch's own formula registry.
An operation whose operand is (a view of) a prunable weight counts its MACs times the
fraction of non-zero entries of that operand; the others are fixed MACs. A prunable weight
read by an operation that has no FLOP formula is reported as uncounted, so that a use the
cost model might have missed cannot pass unnoticed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from falcon_prune.analysis.costs import plain_kernels, unsaved_activations
from falcon_prune.analysis.macs import LOOKUPS
from falcon_prune.analysis.prunable import Selector, prunable_parameters
from falcon_prune.data.batches import batch_size
from falcon_prune.errors import ModelError


@dataclass
class MacCount:
    """MACs per input sample: ``kept`` and ``dense`` of the prunable weights' operations,
    ``fixed`` of the operations that use no prunable weight; ``uncounted`` maps a weight
    that an operation without a FLOP formula read to that operation."""

    kept: float = 0.0
    dense: float = 0.0
    fixed: float = 0.0
    uncounted: dict[str, str] = field(default_factory=dict)


def _storages(weights: dict[str, torch.Tensor]) -> dict[int, str]:
    return {w.untyped_storage().data_ptr(): n for n, w in weights.items()}


def _weight_operands(args: Iterable, storages: dict[int, str]) -> list[torch.Tensor]:
    return [a for a in args if isinstance(a, torch.Tensor)
            and a.untyped_storage().data_ptr() in storages]


def _density_formula(packet, count: MacCount, storages: dict[int, str], scale: float):
    """A raw FlopCounterMode formula for ``packet``: PyTorch's own FLOPs, recorded as kept
    and dense (times the operand's non-zero fraction) or as fixed MACs."""
    base = flop_registry[packet]

    def formula(*args, out_val=None, **kwargs):
        flops = base(*args, out_val=out_val, **kwargs)
        macs = flops / 2 / scale
        operands = _weight_operands(args, storages)
        if operands:
            w = operands[0]
            count.dense += macs
            count.kept += macs * float(w.count_nonzero()) / max(1, w.numel())
        else:
            count.fixed += macs
        return flops

    formula._get_raw = True  # receive the tensors, not their shapes
    return formula


class _ReadAudit(TorchDispatchMode):
    """Records prunable weights read by operations that have no FLOP formula."""

    def __init__(self, storages: dict[int, str], count: MacCount):
        super().__init__()
        self.storages, self.count = storages, count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        operands = _weight_operands(args, self.storages)
        if not operands or func.overloadpacket in flop_registry:
            return out
        if func.overloadpacket in LOOKUPS:
            return out  # a lookup: no multiply-accumulates
        outs = out if isinstance(out, (tuple, list)) else (out,)
        ptrs = {a.untyped_storage().data_ptr() for a in operands}
        if not any(isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() in ptrs
                   for o in outs):  # not a view of the weight
            for a in operands:
                name = self.storages[a.untyped_storage().data_ptr()]
                self.count.uncounted.setdefault(name, str(func.overloadpacket))
        return out


def recount(model: nn.Module, inputs: object, call: Callable[[nn.Module, object], object],
            exclude: Iterable[str] = (), include_params: Selector | None = None,
            exclude_params: Selector | None = None) -> MacCount:
    """Recount the MACs per sample of ``model`` on ``inputs`` (model inputs of a batch, run
    by ``call(model, inputs)``), counting a prunable weight entry as kept when it is
    non-zero. The prunable parameters are those of the library's definition
    (:func:`~falcon_prune.costs.prunable_parameters` with ``include_params`` and
    ``exclude_params``), less ``exclude`` (names of parameters left dense: fixed). The
    model must hold plain weights (no ``torch.nn.utils.prune`` masks)."""
    skip = set(exclude)
    weights = {n: getattr(m, a) for n, m, a, _ in prunable_parameters(
        model, include_params, exclude_params) if n not in skip}
    if any(w.device.type == "meta" for w in weights.values()):
        raise ModelError("the model is on the meta device; its weights have no values")
    count = MacCount()
    storages = _storages(weights)
    scale = float(batch_size(inputs))
    mapping = {p: _density_formula(p, count, storages, scale) for p in flop_registry
               if isinstance(p, type(torch.ops.aten.mm))}
    was = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    try:
        for p, _ in flags:
            p.requires_grad_(p.is_floating_point())
        with torch.enable_grad(), unsaved_activations(), plain_kernels(model), \
                FlopCounterMode(display=False, custom_mapping=mapping), \
                _ReadAudit(storages, count):
            call(model, inputs)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was)
    return count
