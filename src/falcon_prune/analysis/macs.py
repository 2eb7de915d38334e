"""The MAC formulas of the cost model: a registry of aten operations.

Each entry maps an operation (an ``OpOverloadPacket`` such as ``torch.ops.aten.mm``) to a
pure function of the call's arguments and output giving its multiply-accumulates, as
``torch.utils.flop_counter``'s registry gives FLOPs. The cost model attributes these MACs
to the prunable weights an operation reads; a weight read by an operation without an entry
is left dense (excluded), never treated as free.

The independent recount (:mod:`falcon_prune.analysis.recount`) counts with PyTorch's own
registry instead, so the two can only agree on an operation both know. An entry is
therefore accepted only for an operation that ``torch.utils.flop_counter`` counts too (or
that reads a weight without a product, such as an embedding lookup, registered with
``lookup=True``); the test suite checks that every entry gives the same MACs as PyTorch's
formula. Adding an operation is one call of :func:`register_macs`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.flop_counter import flop_registry

from falcon_prune.errors import ConfigError, ConfigTypeError

aten = torch.ops.aten
#: ``formula(args, out) -> MACs`` of one call
MacFormula = Callable[[tuple, object], float]

#: operation -> its MAC formula
MAC_FORMULAS: dict[object, MacFormula] = {}
#: operations that read a weight without multiplying it (0 MACs), e.g. a table lookup
LOOKUPS: set[object] = set()


def register_macs(op: object, formula: MacFormula | None = None, *, lookup: bool = False
                  ) -> None:
    """Make the cost model count ``op`` (an aten ``OpOverloadPacket``, e.g.
    ``torch.ops.aten.mm``) with ``formula(args, out)`` MACs per call, or with none when
    ``lookup`` (the operation reads a weight without products). The recount counts with
    ``torch.utils.flop_counter``: an operation it has no formula for is refused (register
    one there first with ``torch.utils.flop_counter.register_flop_formula``), so that the
    cost model and the recount cannot disagree on it."""
    if not isinstance(op, torch._ops.OpOverloadPacket):
        raise ConfigTypeError(f"register_macs takes an aten operation such as "
                              f"torch.ops.aten.mm, got {op!r}")
    if lookup:
        LOOKUPS.add(op)
        MAC_FORMULAS[op] = lambda args, out: 0.0
        return
    if not callable(formula):
        raise ConfigTypeError(f"the MAC formula of {op} must be a function (args, out) -> "
                              f"MACs, got {formula!r}")
    if op not in flop_registry:
        raise ConfigError(
            f"{op} has no FLOP formula in torch.utils.flop_counter, so the independent "
            "recount could not check what the cost model counts for it; register one there "
            "first (torch.utils.flop_counter.register_flop_formula)")
    MAC_FORMULAS[op] = formula


def macs_of(func, args: tuple, out: object) -> float | None:
    """MACs of one call of ``func`` (an ``OpOverload``), or None when its operation has no
    formula here."""
    formula = MAC_FORMULAS.get(func.overloadpacket)
    return None if formula is None else formula(args, out)


def _mm(a, b) -> float:
    return a.shape[0] * a.shape[1] * b.shape[1]


def _bmm(a, b) -> float:
    return a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]


def _conv(args: tuple, out) -> float:
    """A convolution: every output (input, if transposed) element of a channel group takes
    one weight row of ``w[0].numel()`` products."""
    x, w, transposed = args[0], args[1], bool(args[6])
    return (x.numel() if transposed else out.numel()) * w[0].numel()


register_macs(aten.mm, lambda args, out: _mm(args[0], args[1]))
register_macs(aten.addmm, lambda args, out: _mm(args[1], args[2]))
register_macs(aten.bmm, lambda args, out: _bmm(args[0], args[1]))
register_macs(aten.baddbmm, lambda args, out: _bmm(args[1], args[2]))
register_macs(aten.convolution, _conv)
register_macs(aten._convolution, _conv)
register_macs(aten.embedding, lookup=True)
