"""Channel structure: which weights are removed together, and the surgery that removes them.

Coupled channels are found by Torch-Pruning's ``DependencyGraph`` (an optional dependency:
``pip install "falcon-prune[structured]"``): a convolution's output channel goes with its
BatchNorm channel and the input channel of every consumer, channels joined by residual
additions or concatenations go together, a depthwise convolution's input channel is its
output channel, and a Linear hidden unit is a row of one layer and a column of the next.
Each coupled *group* has C channels; a *unit* is one channel of one group, the smallest
thing that can be removed.

A unit owns *entries*: positions in the model's parameters (every parameter flattened in
``named_parameters`` order into one global index space). An entry may belong to two units
(a weight of a convolution is in its output channel's unit and in its input channel's
unit); it survives only while every unit that owns it is kept. Costs (MACs) and parameter
counts of a unit are therefore linearised by sharing an entry's value equally among its
owners: the linear total is an upper bound of the true one, which is recounted exactly.

Attention heads: when the output of a Linear layer is reshaped into heads (a view
``(..., C) -> (..., H, d)``, seen while the model runs), the channels of its coupled group
are removed whole heads at a time: a unit is then d consecutive channels, one head of the
query, key and value projections with the output projection's columns that read it. The
head size comes from the model's own reshape, not from a table of architectures.

Layers whose outputs are the network's outputs (a classifier) are never pruned; the input
channels of the stem are not channels of any group.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fnmatch import fnmatch

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from falcon_prune.analysis.costs import CostModel
from falcon_prune.errors import DependencyError, ModelError

ROOT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def torch_pruning():
    """The torch_pruning module, or a DependencyError with the install command."""
    try:
        import torch_pruning as tp
    except ImportError as e:
        raise DependencyError(
            "structure='channels' finds coupled channels with Torch-Pruning: pip install "
            "'falcon-prune[structured]' (or torch-pruning)") from e
    return tp


@dataclass
class ParamSpace:
    """Every parameter of a model flattened into one index space: ``names[k]`` starts at
    ``offsets[k]``; ``flat`` (P,) maps an entry to its index in the cost model's flat
    weight vector (-1 for entries that are not prunable weights)."""

    names: list[str]
    offsets: list[int]
    flat: torch.Tensor
    #: every name of a parameter shared under several names (a tied output head) ->
    #: the name it has in ``names`` (its first)
    alias: dict[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, model: nn.Module, cm: CostModel) -> ParamSpace:
        names, offsets, sizes = [], [0], []
        first: dict[int, str] = {}
        alias = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            if id(p) in first:
                alias[name] = first[id(p)]
                continue
            first[id(p)] = name
            names.append(name)
            sizes.append(p.numel())
            offsets.append(offsets[-1] + p.numel())
        flat = torch.full((offsets[-1],), -1, dtype=torch.int64)
        where = {n: k for k, n in enumerate(names)}
        for lay, a in zip(cm.layers, cm.offsets[:-1], strict=True):
            k = where[alias.get(lay.name, lay.name)]
            flat[offsets[k]:offsets[k + 1]] = torch.arange(a, a + lay.numel)
        return cls(names, offsets, flat, alias)

    @property
    def size(self) -> int:
        return self.offsets[-1]

    def start(self, name: str) -> int:
        return self.offsets[self.names.index(self.alias.get(name, name))]


def _layer_entries(module: nn.Module, start: int, handler: str, idx: torch.Tensor
                   ) -> torch.Tensor:
    """(len(idx), e) global entries of a Conv/Linear weight for channels ``idx``: output
    channels (rows) or input channels (columns, within their channel group)."""
    w = module.weight
    row, inner = w[0].numel(), w[0, 0].numel()
    if handler == "prune_out_channels":
        return start + idx[:, None] * row + torch.arange(row)[None]
    groups = getattr(module, "groups", 1)
    if groups > 1 and groups == w.shape[0] and w.shape[1] == 1:  # depthwise: in == out
        return start + idx[:, None] * row + torch.arange(row)[None]
    per_in, per_out = w.shape[1], w.shape[0] // groups
    local, block = idx % per_in, idx // per_in
    outs = block[:, None] * per_out + torch.arange(per_out)[None]  # (k, per_out)
    base = start + outs * row + local[:, None] * inner  # (k, per_out)
    return (base[..., None] + torch.arange(inner)).reshape(len(idx), -1)


def _item_entries(module: nn.Module, mname: str, space: ParamSpace, handler: str,
                  idx: torch.Tensor, channels: int) -> list[torch.Tensor]:
    """Entries (each (k, e)) that removing channels ``idx`` of one dependency removes."""
    out = []
    own = dict(module.named_parameters(recurse=False))
    if isinstance(module, ROOT_TYPES) and "weight" in own:
        out.append(_layer_entries(module, space.start(f"{mname}.weight"), handler, idx))
        if handler == "prune_out_channels" and own.get("bias") is not None:
            out.append(space.start(f"{mname}.bias") + idx[:, None])
        return out
    if isinstance(module, nn.Embedding) and "weight" in own:  # a column per channel
        rows, dim = own["weight"].shape
        return [space.start(f"{mname}.weight") + torch.arange(rows)[None] * dim + idx[:, None]]
    for pname, p in own.items():  # norms and the like: one entry per channel
        if p.dim() == 1 and p.numel() == channels:
            out.append(space.start(f"{mname}.{pname}") + idx[:, None])
    return out


def _output_layers(graph, model: nn.Module) -> list[nn.Module]:
    """Prunable-type modules whose output channels reach the network's outputs (through
    element-wise operations such as a final softmax): they keep their outputs."""
    out = []
    for m in model.modules():
        if not isinstance(m, ROOT_TYPES) or m not in graph.module2node:
            continue
        node = graph.module2node[m]
        if not node.outputs:
            out.append(m)
            continue
        group = graph.get_pruning_group(m, graph.get_pruner_of_module(m).prune_out_channels,
                                        idxs=[0])
        if any(type(it.dep.target.module).__name__ == "_OutputOp" for it in group.items):
            out.append(m)
    return out


def _grouped_layers(model: nn.Module) -> list[nn.Module]:
    """Convolutions with channel groups that are not depthwise: removing single channels
    would break their group structure, so they keep their channels."""
    return [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
            and 1 < m.groups and not (m.groups == m.in_channels == m.out_channels)]


@dataclass
class ChannelUnits:
    """The m removable units of a model and what each owns.

    ``ptr`` (m+1,) and ``entries`` (E,) are the CSR lists of each unit's global parameter
    entries; ``cover`` (P,) counts the units owning each entry (0: never removed);
    ``group`` and ``channel`` (m,) say which coupled group and which of its channels a unit
    is; ``graph``/``groups`` are Torch-Pruning's, for the surgery; ``widths[g]``
    channels make one unit of group g (the head size of an attention group, else 1), and
    ``channel`` counts units (heads) there."""

    space: ParamSpace
    ptr: torch.Tensor
    entries: torch.Tensor
    cover: torch.Tensor
    group: torch.Tensor
    channel: torch.Tensor
    labels: list[str]
    graph: object
    groups: list
    widths: list[int]

    @property
    def m(self) -> int:
        return len(self.group)

    def unit_of_entries(self) -> torch.Tensor:
        """(E,) the unit of each CSR entry (computed once)."""
        if getattr(self, "_owner", None) is None:
            self._owner = torch.repeat_interleave(torch.arange(self.m), torch.diff(self.ptr))
        return self._owner

    def block(self, g: int, round_to: int | None = None) -> int:
        """How many units of group g are kept or dropped together under ``round_to``: one
        head at a time in a group of heads (already aligned), else ``round_to`` (or 1)."""
        return 1 if self.widths[g] > 1 else (round_to or 1)

    def dead_channels(self, keep: torch.Tensor, g: int) -> list[int]:
        """The channels of group g that the units not in ``keep`` (m,) bool stand for, in
        order: a unit of a head group is its ``widths[g]`` consecutive channels."""
        w = self.widths[g]
        return [c * w + j for c in self.channel[(self.group == g) & ~keep].tolist()
                for j in range(w)]

    def alive_entries(self, keep: torch.Tensor) -> torch.Tensor:
        """(P,) bool: entries that survive when the units ``keep`` (m,) bool are kept."""
        dead = torch.zeros(self.space.size, dtype=torch.int64)
        dead.index_add_(0, self.entries, (~keep).to(torch.int64)[self.unit_of_entries()])
        return dead == 0

    def weight_mask(self, keep: torch.Tensor) -> torch.Tensor:
        """(p,) bool over the cost model's flat weights that survive ``keep``."""
        alive = self.alive_entries(keep)
        flat = self.space.flat
        mask = torch.ones(int(flat.max()) + 1, dtype=torch.bool)
        sel = flat >= 0
        mask[flat[sel]] = alive[sel]
        return mask

    def shares(self, values: torch.Tensor) -> torch.Tensor:
        """(m,) each unit's share of per-entry ``values`` (P,): an entry's value split
        equally among the units that own it (the linearised cost or count)."""
        per = values.double() / self.cover.clamp_min(1).double()
        out = torch.zeros(self.m, dtype=torch.float64)
        out.index_add_(0, self.unit_of_entries(), per[self.entries])
        return out


def kept_layers(model: nn.Module, keep_layers: tuple[str, ...]) -> tuple[str, ...]:
    """The names of ``model``'s modules that ``keep_layers`` (module names or globs)
    match; ModelError for a name or glob that matches none."""
    modules = [m for m, _ in model.named_modules()]
    unknown = [n for n in keep_layers if not any(fnmatch(m, n) for m in modules)]
    if unknown:
        raise ModelError(f"keep_layers names modules the model does not have: {unknown}")
    return tuple(m for m in modules if any(fnmatch(m, n) for n in keep_layers))


def channel_units(model: nn.Module, cm: CostModel, inputs: object,
                  call: Callable[[nn.Module, object], object],
                  keep_layers: tuple[str, ...] = ()) -> ChannelUnits:
    """The units of ``model`` from Torch-Pruning's dependency graph traced on ``inputs``
    (run by ``call(model, inputs)``); output layers, ``keep_layers`` and the cost model's
    excluded layers keep their output channels, and a unit touching an excluded weight is
    not removable."""
    tp = torch_pruning()
    names = {id(m): n for n, m in model.named_modules()}
    modules = dict(model.named_modules())
    keep_layers = kept_layers(model, keep_layers)
    heads = head_sizes(model, inputs, call)
    _refuse_grouped_query({n: d for n, d in heads.items() if n not in keep_layers}, modules)
    graph = _graph(tp, model, inputs, call)
    if not _traceable(model, inputs, call):
        raise ModelError(
            "the model's channel dependencies could not be traced: its output has no "
            "autograd graph (is the forward run under torch.no_grad?); structure='channels' "
            "needs a traceable model (use structure='weights' for unstructured pruning)")
    kept = _output_layers(graph, model) + [modules[n] for n in keep_layers]
    kept += [modules[e.name.rpartition(".")[0]] for e in cm.excluded
             if isinstance(modules.get(e.name.rpartition(".")[0]), ROOT_TYPES)]
    kept += _grouped_layers(model)
    groups = [g for g in graph.get_all_groups(ignored_layers=kept, root_module_types=ROOT_TYPES)
              if not any(isinstance(it.dep.target.module, nn.MultiheadAttention)
                         for it in g.items)]  # attention's width stays (heads must divide it)
    space = ParamSpace.of(model, cm)
    _check_heads_coupled(groups, names, heads)
    pairs, group_of, channel_of, labels, widths = [], [], [], [], []
    for gi, g in enumerate(groups):
        base, channels = len(group_of), len(g.items[0].idxs)
        width = _group_width(g, names, heads, channels)
        root = names[id(g.items[0].dep.target.module)]
        for it in g.items:
            module = it.dep.target.module
            if id(module) not in names or not isinstance(module, nn.Module):
                continue
            if any(i is None for i in it.root_idxs):
                raise ModelError(
                    f"the channels of {names[id(module)]} are coupled with those of {root} "
                    "through an operation whose index mapping is unknown (e.g. a repeat); "
                    f"keep them whole with keep_layers=['{names[id(module)]}', '{root}']")
            idx = torch.as_tensor(list(it.idxs), dtype=torch.int64)
            units = base + torch.as_tensor(list(it.root_idxs), dtype=torch.int64) // width
            for e in _item_entries(module, names[id(module)], space, it.dep.handler.__name__,
                                   idx, len(idx)):
                pairs.append(torch.stack([units[:, None].expand_as(e), e]).reshape(2, -1))
        group_of += [gi] * (channels // width)
        channel_of += list(range(channels // width))
        labels += ([f"{root}[head {h}]" for h in range(channels // width)] if width > 1
                   else [f"{root}[{c}]" for c in range(channels)])
        widths.append(width)
    fixed = [(names[id(m)] + ".weight", m.weight.numel()) for m in _grouped_layers(model)]
    fixed += [(e.name, e.weights) for e in cm.excluded]
    return _assemble(space, pairs, group_of, channel_of, labels, graph, groups, fixed,
                     widths)


def _refuse_grouped_query(heads: dict[str, int], modules: dict[str, nn.Module]) -> None:
    """Refuse, before tracing, an attention whose head-split layers have different head
    counts (grouped-query attention): the dependency graph cannot couple a key/value head
    with its query heads (Torch-Pruning runs for minutes on such a model)."""
    counts: dict[str, dict[str, int]] = {}
    for name, d in heads.items():
        counts.setdefault(name.rpartition(".")[0], {})[name] = modules[name].out_features // d
    for parent, found in counts.items():
        if len(set(found.values())) > 1:
            said = ", ".join(f"{n}: {h} heads" for n, h in sorted(found.items()))
            raise ModelError(
                f"{parent or 'the model'} has grouped-query attention ({said}), whose "
                "key/value groups the channel dependency graph cannot couple with their "
                "query heads; keep them whole with keep_layers="
                f"{sorted(found)}, or use loss_model='layerwise' (structured pruning "
                "block by block finds the groups from the model)")


def _check_heads_coupled(groups: list, names: dict, heads: dict[str, int]) -> None:
    """Layers split into heads under one parent module (an attention's query, key and
    value) must share one group, so that a head goes from all of them at once; otherwise
    (e.g. fewer key/value heads than query heads) refuse, naming keep_layers."""
    where: dict[str, dict[str, set[int]]] = {}
    for gi, g in enumerate(groups):
        for name in _head_layers(g, names, heads):
            where.setdefault(name.rpartition(".")[0], {}).setdefault(name, set()).add(gi)
    for found in where.values():
        if len(set().union(*found.values())) > 1:
            raise ModelError(
                f"the layers {sorted(found)} are split into heads but not coupled channel "
                "for channel (e.g. fewer key/value heads than query heads), so their heads "
                f"cannot be removed together; keep them whole with keep_layers="
                f"{sorted(found)}")


def _head_layers(group, names: dict, heads: dict[str, int]) -> Iterator[str]:
    """Names of the layers of a Torch-Pruning group whose output channels it removes and
    the model splits into heads."""
    for it in group.items:
        name = names.get(id(it.dep.target.module))
        if name in heads and it.dep.handler.__name__ == "prune_out_channels":
            yield name


def _group_width(group, names: dict, heads: dict[str, int], channels: int) -> int:
    """Channels per unit of a Torch-Pruning group: the head size when the output channels
    of one of its layers are reshaped into heads (all such layers agreeing), else 1."""
    sizes = {heads[name] for name in _head_layers(group, names, heads)}
    if not sizes:
        return 1
    if len(sizes) > 1 or channels % next(iter(sizes)):
        raise ModelError(
            f"layers coupled with {names[id(group.items[0].dep.target.module)]} are split "
            f"into heads of different sizes {sorted(sizes)}; keep them whole with "
            "keep_layers=[...]")
    return sizes.pop()


def head_sizes(model: nn.Module, inputs: object,
               call: Callable[[nn.Module, object], object]) -> dict[str, int]:
    """{name: d} of the Linear layers whose whole output (..., C) the model reshapes into
    heads (..., C // d, d) right after it, seen while running ``call(model, inputs)``."""
    out_width = {n: m.out_features for n, m in model.named_modules()
                 if isinstance(m, nn.Linear)}
    return {name: d for (name, offset, width), d in head_segments(
        model, inputs, call, (nn.Linear,)).items() if offset == 0 and width == out_width[name]}


def head_segments(model: nn.Module, inputs: object,
                  call: Callable[[nn.Module, object], object],
                  types: tuple[type, ...] = (nn.Linear,)) -> dict[tuple[str, int, int], int]:
    """{(name, offset, width): d} of the output segments (channels offset ... offset +
    width - 1, the whole output or a piece split off it, as a fused query/key/value
    projection's) of the ``types`` layers that the model reshapes into heads of size d,
    seen while running ``call(model, inputs)``."""
    outputs: dict[int, tuple[str, int, torch.Tensor]] = {}

    def hook(name):
        def record(module, args, out):
            if isinstance(out, torch.Tensor) and out.dim() >= 2:
                outputs[id(out)] = (name, 0, out)  # the tensor is kept: its id stays unique
        return record

    found: dict[tuple[str, int, int], int] = {}
    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, types)]
    try:
        with torch.no_grad(), _HeadViews(outputs, found):
            call(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return found


def _split_dim(op: str, args: tuple, kwargs: dict) -> int:
    """The dimension a split (self, size, dim) or a slice/narrow (self, dim, ...) cuts."""
    at = 2 if op in ("split", "split_with_sizes") else 1
    return kwargs.get("dim", args[at] if len(args) > at else 0)


class _HeadViews(TorchDispatchMode):
    """Records, for tensors in ``outputs`` ({id: (name, offset, tensor)}: a layer's output
    or a segment of it), views that split the last dimension C into (H, d) with
    1 < d < C: ``found[(name, offset, C)] = d``. Segments split or sliced off the last
    dimension, and the results of element-wise operations, are followed."""

    VIEWS = ("view", "_unsafe_view", "reshape")
    #: element-wise operations a layer's output may pass through before the split (a
    #: query scaled by 1/sqrt(d), a cast): their output stands for the layer's
    ELEMENTWISE = ("mul", "div", "add", "sub", "_to_copy", "clone", "contiguous")
    SPLITS = ("split", "split_with_sizes", "slice", "narrow")

    def __init__(self, outputs: dict, found: dict):
        super().__init__()
        self.outputs, self.found = outputs, found

    def _pieces(self, name: str, offset: int, src: torch.Tensor, out: object) -> None:
        """Follow the segments of the last dimension that a split or slice made."""
        pieces = out if isinstance(out, (list, tuple)) else [out]
        last = src.shape[-1]
        start = offset
        for piece in pieces:
            if not isinstance(piece, torch.Tensor) or piece.shape[:-1] != src.shape[:-1]:
                return
            if piece.shape[-1] == last:
                return
            begin = start if isinstance(out, (list, tuple)) else (
                offset + piece.storage_offset() - src.storage_offset())
            self.outputs[id(piece)] = (name, begin, piece)
            start += piece.shape[-1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        src = args[0] if args else None
        if not isinstance(src, torch.Tensor) or id(src) not in self.outputs:
            return out
        name, offset, _ = self.outputs[id(src)]
        op = func.overloadpacket.__name__
        if op in self.ELEMENTWISE and isinstance(out, torch.Tensor) and out.shape == src.shape:
            self.outputs[id(out)] = (name, offset, out)
        elif op in self.SPLITS and _split_dim(op, args, kwargs or {}) in (-1, src.dim() - 1):
            self._pieces(name, offset, src, out)
        elif (op in self.VIEWS and isinstance(out, torch.Tensor)
                and out.dim() == src.dim() + 1 and out.shape[:-2] == src.shape[:-1]):
            C, d = src.shape[-1], out.shape[-1]
            if 1 < d < C and out.shape[-2] * d == C:
                self.found[(name, offset, C)] = d
        return out


def _traceable(model: nn.Module, inputs: object,
               call: Callable[[nn.Module, object], object]) -> bool:
    """Whether the model's output carries an autograd graph back to its parameters (what
    the dependency graph is traced from)."""
    from falcon_prune.data.tasks import logits_of

    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(p.is_floating_point())
        with torch.enable_grad():
            return logits_of(call(model, inputs)).grad_fn is not None
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _graph(tp, model: nn.Module, inputs: object, call: Callable[[nn.Module, object], object]):
    """Torch-Pruning's dependency graph of ``model``, traced with gradients enabled."""
    from falcon_prune.data.tasks import logits_of

    flags = [(p, p.requires_grad) for p in model.parameters()]
    was = model.training
    try:
        for p, _ in flags:
            p.requires_grad_(p.is_floating_point())
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(
                model, example_inputs=inputs, verbose=False,
                forward_fn=lambda m, x: logits_of(call(m, x)))
    except Exception as e:  # a graph Torch-Pruning cannot trace
        raise ModelError(
            f"the model's channel dependencies could not be traced ({type(e).__name__}: {e}); "
            "structure='channels' needs a model that Torch-Pruning's DependencyGraph can "
            "trace (use structure='weights' for unstructured pruning)") from e
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was)


def _assemble(space: ParamSpace, pairs: list, group_of: list, channel_of: list,
              labels: list, graph, groups: list, fixed: list[tuple[str, int]],
              widths: list[int]) -> ChannelUnits:
    """CSR lists from (unit, entry) pairs; units that touch a ``fixed`` weight (name,
    size: excluded or grouped layers, which keep their channels) are dropped."""
    if not pairs:
        raise ModelError("the model has no channels that can be removed (every layer's "
                         "outputs leave the network or are kept)")
    both = torch.unique(torch.cat(pairs, 1)[0] * space.size + torch.cat(pairs, 1)[1])
    unit, entry = both // space.size, both % space.size
    bad = torch.zeros(len(group_of), dtype=torch.bool)
    for name, size in fixed:
        a = space.start(name)
        inside = (entry >= a) & (entry < a + size)
        bad[unit[inside]] = True
    keep = ~bad[unit]
    unit, entry = unit[keep], entry[keep]
    alive = (~bad).nonzero().reshape(-1)
    renumber = torch.full((len(group_of),), -1, dtype=torch.int64)
    renumber[alive] = torch.arange(len(alive))
    unit = renumber[unit]
    counts = torch.bincount(unit, minlength=len(alive))
    ptr = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(counts, 0)])
    cover = torch.bincount(entry, minlength=space.size)
    pick = alive.tolist()
    return ChannelUnits(space, ptr, entry, cover, torch.tensor(group_of)[alive],
                        torch.tensor(channel_of)[alive], [labels[i] for i in pick], graph,
                        groups, widths)


def remove_channels(units: ChannelUnits, keep: torch.Tensor) -> None:
    """Physically remove, in place, the channels of the units not in ``keep`` (m,) bool
    from the model the units were built on (Torch-Pruning's surgery)."""
    for gi, g in enumerate(units.groups):
        drop = units.dead_channels(keep, gi)
        if drop:
            g.prune(idxs=sorted(drop))
