"""FLOP cost model: the multiply-accumulates (MACs) each prunable weight takes part in.

A *prunable weight* is an entry of the ``weight`` of a ``Conv1d``/``Conv2d``/``Conv3d`` or
``Linear`` module. Its cost ``f_i`` is the number of MACs it takes part in for one input
sample, summed over every use in one forward pass.

Costs are read at the level of the operations, not of the modules: one forward pass runs
under a ``TorchDispatchMode`` that sees every aten operation, maps its operands back to the
prunable weights they alias (views included: ``t``, ``view``, ``expand``, ...) and adds the
operation's MACs to the weights it used. A weight used by another module's forward (as
``nn.MultiheadAttention`` uses its ``out_proj`` through ``F.linear``) is therefore counted.

A weight that an operation reads without this model being able to count its MACs (a fused
kernel, a copy or a product with something else that feeds later products, a use of only
part of the tensor) is never treated as free: it is *excluded*, left dense and outside the
budget, and the reason is reported (:attr:`CostModel.excluded`).

MAC rules (per call, from the operand shapes): ``mm``/``addmm`` m·k·n, ``bmm``/``baddbmm``
b·m·k·n, ``mv``/``addmv`` m·k, ``dot`` k, convolutions (any dimension, groups, transposed)
output positions x kernel volume x input channels per group. ``embedding`` reads a weight
with no MACs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from falcon_prune.batches import batch_size
from falcon_prune.errors import ModelError

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
aten = torch.ops.aten


def _mm(a, b, *_: object) -> float:
    return a.shape[0] * a.shape[1] * b.shape[1]


def _bmm(a, b, *_: object) -> float:
    return a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]


def _conv(out, x, w, transposed) -> float:
    """MACs of a convolution: every output (input, if transposed) element of a channel
    group takes one weight row of ``w[0].numel()`` products."""
    return (x.numel() if transposed else out.numel()) * w[0].numel()


def _macs(func, args, out) -> float | None:
    """MACs of one call, or None when ``func`` has no MAC rule here."""
    packet = func.overloadpacket
    if packet in (aten.mm,):
        return _mm(args[0], args[1])
    if packet in (aten.addmm,):
        return _mm(args[1], args[2])
    if packet in (aten.bmm,):
        return _bmm(args[0], args[1])
    if packet in (aten.baddbmm,):
        return _bmm(args[1], args[2])
    if packet in (aten.mv,):
        return args[0].shape[0] * args[0].shape[1]
    if packet in (aten.addmv,):
        return args[1].shape[0] * args[1].shape[1]
    if packet in (aten.dot,):
        return args[0].shape[0]
    if packet in (aten.convolution, aten._convolution):
        return _conv(out, args[0], args[1], bool(args[6]))
    if packet in (aten.embedding,):
        return 0.0
    return None


@dataclass(frozen=True)
class PrunableLayer:
    """One prunable weight tensor: ``cost`` is the MACs per weight per input sample (one
    value for the whole tensor), ``calls`` the operations that used it in the probe."""

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


@dataclass(frozen=True)
class ExcludedLayer:
    """A weight of a prunable type left dense and outside the budgets, and why."""

    name: str
    kind: str
    weights: int
    reason: str


def find_prunable_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """All (qualified name, module) pairs of prunable layers, in registration order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)]


def _coverage(operand: torch.Tensor, weight: torch.Tensor) -> float | None:
    """How many times ``operand`` (aliasing ``weight``'s storage) covers each entry of
    ``weight``: a number (0 when they do not overlap) when it covers every entry equally,
    None otherwise (a slice)."""
    if operand.storage_offset() == weight.storage_offset():
        # a permutation view (t, transpose, view) or a broadcast (expand) of the weight
        pairs = sorted((s, st) for s, st in zip(operand.shape, operand.stride(), strict=True)
                       if st != 0 and s != 1)
        own = sorted((s, st) for s, st in zip(weight.shape, weight.stride(), strict=True)
                     if s != 1)
        if pairs == own:
            return operand.numel() / max(1, weight.numel())
    n = weight.untyped_storage().nbytes() // weight.element_size()
    base = torch.arange(n)
    try:
        own_pos = torch.as_strided(base, weight.shape, weight.stride(), weight.storage_offset())
        op_pos = torch.as_strided(base, operand.shape, operand.stride(),
                                  operand.storage_offset())
    except RuntimeError:
        return None
    counts = torch.bincount(op_pos.reshape(-1), minlength=n)[own_pos.reshape(-1)]
    return float(counts[0]) if bool((counts == counts[0]).all()) else None


class _UseCounter(TorchDispatchMode):
    """Adds each operation's MACs to the prunable weights among its operands."""

    def __init__(self, weights: dict[str, torch.Tensor]):
        super().__init__()
        self.weights = weights
        self.by_storage: dict[int, list[str]] = {}
        for name, w in weights.items():
            self.by_storage.setdefault(w.untyped_storage().data_ptr(), []).append(name)
        self.macs = dict.fromkeys(weights, 0.0)
        self.calls = dict.fromkeys(weights, 0)
        self.problems: dict[str, str] = {}

    def _users(self, args) -> list[tuple[torch.Tensor, str]]:
        out = []
        for a in args:
            if isinstance(a, torch.Tensor) and a.device.type != "meta":
                for name in self.by_storage.get(a.untyped_storage().data_ptr(), ()):
                    out.append((a, name))
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        users = self._users(args)
        if not users:
            return out
        ptrs = {a.untyped_storage().data_ptr() for a, _ in users}
        outs = out if isinstance(out, (tuple, list)) else (out,)
        if any(isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() in ptrs
               for o in outs):
            return out  # a view (or in-place) of the weight: its later uses are counted
        macs = _macs(func, args, out)
        names = {name for _, name in users}
        for operand, name in users:
            cover = _coverage(operand, self.weights[name]) if macs is not None else None
            if macs is None:
                self.problems.setdefault(
                    name, f"read by {func.overloadpacket}, whose multiply-accumulates this "
                    "cost model does not count")
            elif len(names) > 1 and macs:
                others = ", ".join(sorted(names - {name}))
                self.problems.setdefault(name, f"multiplied by another prunable weight "
                                               f"({others}) in {func.overloadpacket}")
            elif cover is None:
                self.problems.setdefault(name, f"only part of it is used by {func}")
            elif cover > 0:
                self.macs[name] += macs * cover / operand.numel() * self.weights[name].numel()
                self.calls[name] += 1
        return out


def _probe(model: nn.Module, weights: dict[str, torch.Tensor], run: Callable[[], object]
           ) -> _UseCounter:
    """Run ``run()`` once under the counter, in eval mode and with gradients enabled (so
    that no fused inference-only kernel replaces the plain operations)."""
    was = model.training
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    counter = _UseCounter(weights)
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(p.is_floating_point() or p.is_complex())
        with torch.enable_grad(), counter:
            run()
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was)
    return counter


def prunable_weights(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[ExcludedLayer]]:
    """({module name: weight} of the prunable layers, the tied ones left out). A weight
    shared with another parameter name (tied, as GPT-2's output layer and its token
    embedding) is excluded; masked (``torch.nn.utils.prune``) or meta-device weights are
    refused with the fix."""
    names: dict[tuple[int, int], list[str]] = {}  # by storage and offset: ties and copies
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.device.type != "meta" and p.numel():
            key = (p.untyped_storage().data_ptr(), p.storage_offset())
            names.setdefault(key, []).append(name)
    weights: dict[str, torch.Tensor] = {}
    excluded: list[ExcludedLayer] = []
    for name, module in find_prunable_modules(model):
        w = module.weight
        if not isinstance(w, nn.Parameter):
            raise ModelError(
                f"{name}.weight is not a plain parameter (a torch.nn.utils.prune mask or a "
                "parametrization); fold it first, e.g. with falcon_prune.make_permanent")
        if w.device.type == "meta":
            raise ModelError(
                f"the model is on the meta device ({name}.weight has no data); load its "
                "weights first (e.g. model.to_empty(device='cpu') and load_state_dict)")
        key = (w.untyped_storage().data_ptr(), w.storage_offset())
        others = [n for n in names.get(key, []) if n != f"{name}.weight"]
        if others:
            excluded.append(ExcludedLayer(name, type(module).__name__, w.numel(),
                                          f"tied to {', '.join(others)} (a shared weight)"))
            continue
        weights[name] = w
    return weights, excluded


class CostModel:
    """Per-layer FLOP costs of a model's prunable weights, from one probing forward pass.

    Weights are ordered layer by layer (registration order), each layer flattened in
    row-major order: this is the order of every flat weight vector in the library.
    ``excluded`` lists the weights of prunable type left dense and outside the budgets.
    """

    def __init__(self, layers: list[PrunableLayer], excluded: list[ExcludedLayer] | None = None):
        if not layers:
            why = "" if not excluded else (
                "; the only candidates were left out: " + "; ".join(
                    f"{e.name} ({e.reason})" for e in excluded))
            raise ModelError(
                "the model has no prunable layers (Conv1d/Conv2d/Conv3d/Linear weights) whose "
                f"cost can be counted{why}"
            )
        self.layers = layers
        self.excluded = list(excluded or [])
        self.offsets = [0]
        for lay in layers:
            self.offsets.append(self.offsets[-1] + lay.numel)

    @classmethod
    def from_model(cls, model: nn.Module, inputs: object,
                   call: Callable[[nn.Module, object], object] | None = None) -> CostModel:
        """Probe ``model`` once on ``inputs`` (a batch of model inputs: a tensor, or a
        tuple/dict of them) run by ``call(model, inputs)`` (default: ``model(x)``,
        ``model(*x)`` or ``model(**x)``) and record every prunable weight's cost."""
        from falcon_prune.tasks import call_model

        call = call or call_model
        weights, excluded = prunable_weights(model)
        if not weights and not excluded:
            raise ModelError(
                f"{type(model).__name__} has no prunable layers (Conv1d/Conv2d/Conv3d/Linear); "
                "nothing to prune"
            )
        n = batch_size(inputs)
        counter = _probe(model, weights, lambda: call(model, inputs))
        modules = dict(find_prunable_modules(model))
        layers = []
        for name, w in weights.items():
            kind = type(modules[name]).__name__
            if name in counter.problems:
                excluded.append(ExcludedLayer(name, kind, w.numel(), counter.problems[name]))
                continue
            layers.append(PrunableLayer(name, modules[name], kind, tuple(w.shape),
                                        counter.macs[name] / w.numel() / n, counter.calls[name]))
        return cls(layers, excluded)

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
        return float(sum(lay.cost * int(m.count_nonzero())
                         for lay, m in zip(self.layers, self.split(mask), strict=True)))

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Split a flat (p,) vector into per-layer tensors of the weights' shapes (views)."""
        return [
            flat[a:b].view(lay.shape)
            for lay, a, b in zip(self.layers, self.offsets[:-1], self.offsets[1:], strict=True)
        ]


def flatten_weights(cost_model: CostModel, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(p,) vector of the current prunable weights, in ``dtype`` (default: the weights' own,
    promoted to one)."""
    flat = torch.cat([lay.module.weight.detach().reshape(-1) for lay in cost_model.layers])
    return flat if dtype is None else flat.to(dtype)
