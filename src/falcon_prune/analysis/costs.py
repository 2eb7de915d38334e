"""FLOP cost model: the multiply-accumulates (MACs) each prunable weight takes part in.

A *prunable weight* is an entry of a prunable parameter (which parameters are prunable:
:mod:`falcon_prune.analysis.prunable`). A parameter shared by several modules (tied) is
one prunable weight, pruned once and costed with every use. Its cost ``f_i`` is the number
of MACs it takes part in for one input sample, summed over every use in one forward pass.

Costs are read at the level of the operations, not of the modules: one forward pass runs
under a ``TorchDispatchMode`` that sees every aten operation, maps its operands back to the
prunable weights they alias (views included: ``t``, ``view``, ``expand``, ...) and adds the
operation's MACs to the weights it used. A weight used by another module's forward (as
``nn.MultiheadAttention`` uses its ``out_proj`` through ``F.linear``) is therefore counted.

A weight that an operation reads without this model being able to count its MACs (a fused
kernel, a copy or a product with something else that feeds later products, a use of only
part of the tensor) is never treated as free: it is *excluded*, left dense and outside the
budget, and the reason is reported (:attr:`CostModel.excluded`).

MAC rules (per call, from the operand shapes) are the registry of
:mod:`falcon_prune.analysis.macs`: ``mm``/``addmm`` m·k·n, ``bmm``/``baddbmm`` b·m·k·n,
convolutions (any dimension, groups, transposed) output positions x kernel volume x input
channels per group; ``embedding`` reads a weight with no MACs. Operations that use no
prunable weight (attention's products of queries, keys and values, any ``bmm`` or
``matmul`` of activations) are the network's *fixed* MACs (:attr:`CostModel.fixed_macs`);
the probe runs attention through PyTorch's math backend so that its products are seen as
such.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from falcon_prune.analysis.macs import macs_of
from falcon_prune.analysis.prunable import (
    ExcludedLayer,
    Selector,
    prunable_weights,
)
from falcon_prune.data.batches import batch_size
from falcon_prune.errors import BudgetError, ConfigError, ModelError


@dataclass(frozen=True)
class PrunableLayer:
    """One prunable parameter: ``name`` is its full name (``"layer1.0.conv1.weight"``),
    ``module`` and ``param`` where it lives (and ``aliases``, the other (module, attribute)
    pairs that hold the same tied parameter); ``cost`` is the MACs per entry per input
    sample (one value for the whole tensor), ``calls`` the operations that used it."""

    name: str
    module: nn.Module = field(repr=False, compare=False)
    param: str
    kind: str
    shape: tuple[int, ...]
    cost: float
    calls: int
    aliases: tuple = field(default=(), repr=False, compare=False)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def dense_macs(self) -> float:
        return self.numel * self.cost

    @property
    def tensor(self) -> torch.Tensor:
        """The parameter itself."""
        return getattr(self.module, self.param)

    @property
    def holders(self) -> list[tuple[nn.Module, str]]:
        """Every (module, attribute) that holds the parameter, this one first."""
        return [(self.module, self.param), *self.aliases]


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
        self.fixed = 0.0  # MACs of operations that use no prunable weight
        self.uncounted = 0  # operations on excluded weights whose MACs are unknown

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
            self.fixed += macs_of(func, args, out) or 0.0
            return out
        ptrs = {a.untyped_storage().data_ptr() for a, _ in users}
        outs = out if isinstance(out, (tuple, list)) else (out,)
        if any(isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() in ptrs
               for o in outs):
            return out  # a view (or in-place) of the weight: its later uses are counted
        macs = macs_of(func, args, out)
        names = {name for _, name in users}
        self._settle(func, args, macs, users, names)
        return out

    def _settle(self, func, args, macs, users, names) -> None:
        """Attribute one operation's MACs to its prunable operands, or note why not."""
        counted = False
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
                counted = True
        if not counted:  # the MACs of a weight left dense: fixed (when they are known)
            self.fixed += macs or 0.0
            self.uncounted += macs is None


def unsaved_activations():
    """A context in which autograd records the graph but keeps none of the tensors it
    would need for a backward pass: a forward that is only counted (with gradients enabled,
    so that it takes the same operations as in training) then costs no activation memory.
    Nothing may call backward inside."""
    return torch.autograd.graph.saved_tensors_hooks(lambda t: None, lambda _: None)


def _probe(model: nn.Module, weights: dict[str, torch.Tensor], run: Callable[[], object]
           ) -> _UseCounter:
    """Run ``run()`` once under the counter, in eval mode and with gradients enabled (so
    that no fused inference-only kernel replaces the plain operations), keeping no
    activations."""
    was = model.training
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    counter = _UseCounter(weights)
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(p.is_floating_point() or p.is_complex())
        with torch.enable_grad(), unsaved_activations(), counter:
            run()
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was)
    return counter


@contextmanager
def plain_kernels(model: nn.Module) -> Iterator[None]:
    """Run attention through PyTorch's math backend and, in a model with recurrent layers,
    those layers without oneDNN: the decomposed matrix products are what cost counting
    and the recount see (oneDNN's fused recurrent kernel has no MAC rule). Gradients take
    attention the same way; recurrent layers there are unrolled instead
    (:mod:`falcon_prune.analysis.recurrent`), since vmap cannot batch either fused kernel."""
    recurrent = any(isinstance(m, nn.RNNBase) for m in model.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # oneDNN's flags warn about TF32 on Intel GPUs
        with ExitStack() as stack:
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            if recurrent:
                stack.enter_context(torch.backends.mkldnn.flags(enabled=False))
            yield


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
                f"the model has no prunable parameters whose cost can be counted{why}")
        self.layers = layers
        self.excluded = list(excluded or [])
        self.fixed_macs = 0.0  # MACs per sample of operations without a prunable weight
        self.uncounted_ops = 0  # operations on excluded weights with no MAC rule
        self.offsets = [0]
        for lay in layers:
            self.offsets.append(self.offsets[-1] + lay.numel)

    @classmethod
    def from_model(cls, model: nn.Module, inputs: object,
                   call: Callable[[nn.Module, object], object] | None = None,
                   include: Selector | None = None, exclude: Selector | None = None
                   ) -> CostModel:
        """Probe ``model`` once on ``inputs`` (a batch of model inputs: a tensor, or a
        tuple/dict of them) run by ``call(model, inputs)`` (default: ``model(x)``,
        ``model(*x)`` or ``model(**x)``) and record every prunable weight's cost and the
        fixed MACs; ``include``/``exclude`` change the prunable set."""
        from falcon_prune.data.tasks import call_model

        call = call or call_model
        weights, excluded = prunable_weights(model, include, exclude)
        if not weights and not excluded:
            raise ModelError(f"{type(model).__name__} has no prunable parameters (Conv, "
                             "Linear, recurrent or attention weights); nothing to prune")
        n = batch_size(inputs)
        tensors = {name: getattr(m, a) for name, (m, a, _) in weights.items()}
        with plain_kernels(model):
            counter = _probe(model, tensors, lambda: call(model, inputs))
        layers = []
        for name, (module, attr, aliases) in weights.items():
            w = tensors[name]
            kind = type(module).__name__
            if name in counter.problems:
                excluded.append(ExcludedLayer(name, kind, w.numel(), counter.problems[name]))
                continue
            layers.append(PrunableLayer(name, module, attr, kind, tuple(w.shape),
                                        counter.macs[name] / w.numel() / n,
                                        counter.calls[name], aliases))
        out = cls(layers, excluded)
        out.fixed_macs = counter.fixed / n
        out.uncounted_ops = counter.uncounted
        return out

    def budget_macs(self, fraction: float, of: str = "prunable") -> float:
        """Kept MACs of the prunable weights allowed by a FLOP budget ``fraction`` of the
        prunable MACs (``of='prunable'``) or of the whole network's (``of='model'``: the
        fixed MACs stay, so they come out of the budget)."""
        if of == "prunable":
            return fraction * self.dense_macs
        if self.uncounted_ops:
            raise ConfigError(
                "flops_of='model' needs every MAC of the network, but a weight left dense is "
                f"read by an operation this cost model cannot count ({self.excluded[0].name}: "
                f"{self.excluded[0].reason}); use flops_of='prunable'")
        total = self.dense_macs + self.fixed_macs
        allowed = fraction * total - self.fixed_macs
        if allowed < 0:
            raise BudgetError(
                f"flops={fraction} of the whole network is {fraction * total:,.0f} MACs per "
                f"sample, below its fixed part ({self.fixed_macs:,.0f} MACs, "
                f"{self.fixed_macs / total:.2%}: operations with no prunable weight, or "
                f"weights left dense); keep at least {self.fixed_macs / total:.4f}")
        return allowed

    def fraction(self, kept_macs: float, of: str = "prunable") -> float:
        """The FLOP fraction kept, in the convention of ``of`` (see :meth:`budget_macs`)."""
        if of == "prunable":
            return kept_macs / self.dense_macs
        return (kept_macs + self.fixed_macs) / (self.dense_macs + self.fixed_macs)

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
    flat = torch.cat([lay.tensor.detach().reshape(-1) for lay in cost_model.layers])
    return flat if dtype is None else flat.to(dtype)
