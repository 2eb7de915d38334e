"""Where a transformer block can be made narrower: its attention and MLP *sites*, found by probing.

A site is a set of *producer* layers whose output rows come in units, and the one
*consumer* layer that reads them, so that removing a unit removes some rows of the
producers and some columns of the consumer and changes nothing else in the block:

- an MLP: the up (and gate) projections and the down projection; a unit is one
  intermediate channel;
- an attention: the query, key and value projections and the output projection; a unit is
  a key/value group with the query heads that read it (one head without grouped-query
  attention).

The sites are found from what the block does, not from its class or its layers' names
(no table of architectures). The block is run on a probe input while
:func:`~falcon_prune.analysis.structure.head_segments` sees which linear outputs (or pieces
split off them, as a fused query/key/value projection's) are split into heads, and then
with some output channels of one layer set to zero: a layer B *reads* the channels of a
layer A when zeroing a set S of A's channels changes exactly the columns S of B's input
(an MLP), or, for a layer split into heads, when zeroing one head changes exactly some
whole heads of B's input (one for a query head, a group of them for a key or value head
under grouped-query attention). The groups are the model's own, not an assumed
``h // n_rep`` rule. Linear maps are ``nn.Linear`` layers and modules with a 2-D weight
whose calls are ``x @ W + b`` (HuggingFace's Conv1D in GPT-2).

Every site is then checked: on a copy of the block, half of its units are removed (rows
and columns sliced out, and the module's integer attributes that count its heads, such as
``num_heads``, lowered), and the copy must give the outputs of the whole block with those
units' consumer columns zeroed (removing equals masking). A site that fails (a model whose
code fixes its head count elsewhere, such as T5's shared position bias) is left whole,
with the reason. The same removal measures a unit's MACs per token (PyTorch's FLOP counter)
and parameters, so the cost model needs no formula of attention.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from falcon_prune.analysis.costs import plain_kernels
from falcon_prune.analysis.structure import head_segments

#: a run of a block on the probe input, returning its output
BlockRun = Callable[[nn.Module], object]
#: relative tolerance of "this input column changed" and of "removing equals masking"
TOLERANCE = 1e-4


@dataclass(frozen=True)
class Site:
    """Units of a block: ``producers`` {relative layer name: (U, r) rows of each unit},
    the ``consumer`` layer (relative name) with ``columns`` (U, c) of each unit in its
    input, ``counters`` {module path '.' attribute: heads per unit} of the integer
    attributes that count heads, ``macs`` MACs per token and ``params`` parameters of one
    unit."""

    kind: str
    producers: dict[str, torch.Tensor]
    consumer: str
    columns: torch.Tensor
    counters: dict[str, int] = field(default_factory=dict)
    macs: float = 0.0
    params: int = 0
    #: the layers whose weight is (in, out) (HuggingFace's Conv1D) rather than (out, in)
    transposed: frozenset[str] = frozenset()
    #: channels per head (1 for an MLP)
    head_dim: int = 1

    @property
    def units(self) -> int:
        return len(self.columns)

    def with_(self, **changes) -> Site:
        return dataclasses.replace(self, **changes)

    def label(self) -> str:
        return f"{self.kind} ({self.consumer}, {self.units} units)"


def block_output(y: object) -> torch.Tensor:
    """The hidden states a block returns (the first element of a tuple)."""
    return y if isinstance(y, torch.Tensor) else y[0]


@dataclass(frozen=True)
class Linear:
    """A linear map of a block: ``d_in`` -> ``d_out`` features; ``transposed`` when its
    weight is (d_in, d_out) (HuggingFace's Conv1D) rather than (d_out, d_in)."""

    module: nn.Module
    d_in: int
    d_out: int
    transposed: bool


def _candidates(block: nn.Module) -> dict[str, nn.Module]:
    """nn.Linear layers, and modules without children whose ``weight`` is 2-D (not an
    embedding): maps of the input's last dimension, as their calls will tell."""
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear) or (
        not isinstance(m, nn.Embedding) and not list(m.children())
        and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2)}


def linears(block: nn.Module, run: BlockRun) -> dict[str, Linear]:
    """The block's linear maps that run on the probe, with their widths and weight
    layout (for a square weight of a module other than nn.Linear, the layout whose
    product gives the module's output)."""
    found: dict[str, Linear] = {}

    def hook(name):
        def record(module, args, out):
            x = args[0] if args else None
            if name in found or not isinstance(x, torch.Tensor) or not isinstance(
                    out, torch.Tensor):
                return
            W, (i, o) = module.weight, (x.shape[-1], out.shape[-1])
            if isinstance(module, nn.Linear):
                found[name] = Linear(module, i, o, False)
                return
            b = getattr(module, "bias", None)
            b = 0 if b is None else b
            for t, shape in ((True, (i, o)), (False, (o, i))):
                if tuple(W.shape) == shape and torch.allclose(
                        x @ (W if t else W.T) + b, out, rtol=1e-4, atol=1e-5):
                    found[name] = Linear(module, i, o, t)
                    return
        return record

    _run_hooked(block, run, [m.register_forward_hook(hook(n))
                             for n, m in _candidates(block).items()])
    return found


def _run_hooked(block: nn.Module, run: BlockRun, handles: list) -> object:
    """The block's output on the probe, without gradients; the hooks ``handles`` are
    removed afterwards."""
    try:
        with torch.no_grad():
            return run(block)
    finally:
        for h in handles:
            h.remove()


def _inputs(block: nn.Module, run: BlockRun, lin: dict[str, Linear],
            zero: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """{layer: its input rows (tokens, d) at its first call} for every linear map ``lin``
    of the block, run with the output channels ``zero[name]`` (bool (d_out,)) of layers
    set to 0."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name, m in ((n, block.get_submodule(n)) for n in lin):
        def pre(module, args, name=name):
            seen.setdefault(name, args[0].detach().reshape(-1, args[0].shape[-1]).clone())
        handles.append(m.register_forward_pre_hook(pre))
        if zero and name in zero:
            keep = (~zero[name]).to(m.weight.dtype)
            handles.append(m.register_forward_hook(lambda mod, a, out, k=keep: out * k))
    _run_hooked(block, run, handles)
    return seen


def _changed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(d,) bool: the columns where inputs ``a`` and ``b`` (tokens, d) differ."""
    scale = float(a.abs().amax()) + 1e-30
    return (a.double() - b.double()).abs().amax(0) > TOLERANCE * scale


def _mlp_sites(block: nn.Module, run: BlockRun, lin: dict[str, Linear], base: dict,
               heads: set[str], gen: torch.Generator) -> list[Site]:
    """The MLP sites: layers whose zeroed channels S change exactly the columns S of a
    consumer's input."""
    found: dict[str, list[str]] = {}
    for p, P in lin.items():
        readers = [r for r, R in lin.items() if r != p and r not in heads and r in base
                   and R.d_in == P.d_out]
        if p in heads or not readers or P.d_out < 2:
            continue
        S = torch.rand(P.d_out, generator=gen) < 0.5
        S[0], S[-1] = True, False
        got = _inputs(block, run, lin, {p: S})
        for r in readers:
            if torch.equal(_changed(base[r], got[r]), S):
                found.setdefault(r, []).append(p)
    sites = []
    for r, ps in found.items():
        idx = torch.arange(lin[r].d_in)[:, None]
        sites.append(Site("mlp", {p: idx for p in ps}, r, idx,
                          transposed=frozenset(n for n in (r, *ps) if lin[n].transposed)))
    return sites


#: a piece of a layer's output split into heads: (layer, first channel, channels)
Segment = tuple[str, int, int]


def _head_map(block: nn.Module, run: BlockRun, lin: dict[str, Linear], base: dict,
              seg: Segment, d: int, reader: str) -> list[frozenset[int]] | None:
    """For each head of segment ``seg`` (head size d), the heads of ``reader``'s input
    that change when it is zeroed; None unless they are whole, non-empty heads."""
    name, offset, width = seg
    out = []
    for j in range(width // d):
        S = torch.zeros(lin[name].d_out, dtype=torch.bool)
        S[offset + j * d:offset + (j + 1) * d] = True
        got = _inputs(block, run, lin, {name: S})[reader]
        ch = _changed(base[reader], got).reshape(-1, d)
        whole = ch.all(1)
        if not whole.any() or not torch.equal(whole, ch.any(1)):
            return None
        out.append(frozenset(whole.nonzero().reshape(-1).tolist()))
    return out


def _partition(maps: dict, n: int) -> list[list[int]] | None:
    """The units: the finest partition of the reader's n heads that every map's sets lie
    within (a key/value group), each a sorted list; None when a map's sets overlap."""
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for sets in maps.values():
        if sum(len(s) for s in sets) != n or len(frozenset().union(*sets)) != n:
            return None
        for s in sets:
            first, *rest = sorted(s)
            for x in rest:
                parent[find(x)] = find(first)
    units: dict[int, list[int]] = {}
    for x in range(n):
        units.setdefault(find(x), []).append(x)
    return sorted(units.values())


def _unit_rows(maps: dict, units: list[list[int]], d: int) -> dict[str, torch.Tensor] | None:
    """{layer: (U, r) its output rows of each unit}, the rows of every segment of a layer
    together; None when units would hold different numbers of a segment's heads."""
    rows: dict[str, list[torch.Tensor]] = {}
    for (name, offset, _), sets in maps.items():
        per = [[j for j, s in enumerate(sets) if s <= set(u)] for u in units]
        if len({len(x) for x in per}) != 1:
            return None
        heads = torch.tensor(per)  # (U, heads of the segment per unit)
        rows.setdefault(name, []).append(
            (offset + heads[..., None] * d + torch.arange(d)).reshape(len(units), -1))
    return {name: torch.cat(parts, 1) for name, parts in rows.items()}


def _attention_site(block: nn.Module, run: BlockRun, lin: dict[str, Linear], base: dict,
                    segments: list[Segment], d: int) -> Site | None:
    """The site of the head-split ``segments`` of one attention (head size d) and the
    one layer that reads all of their heads as whole heads."""
    mine = {name for name, _, _ in segments}
    for r, R in lin.items():
        if r in mine or r not in base or R.d_in % d:
            continue
        maps = {}
        for seg in segments:
            m = _head_map(block, run, lin, base, seg, d, r)
            if m is None:
                break
            maps[seg] = m
        else:
            units = _partition(maps, R.d_in // d)
            rows = None if units is None else _unit_rows(maps, units, d)
            if rows is None:
                continue
            cols = torch.tensor(units)
            cols = (cols[..., None] * d + torch.arange(d)).reshape(len(units), -1)
            return Site("attention", rows, r, cols, transposed=frozenset(
                n for n in (r, *rows) if lin[n].transposed), head_dim=d)
    return None


def query_heads(site: Site) -> Site | None:
    """The site whose unit is the same query head of every key/value group (query head j
    of each group, with its consumer columns), the key and value heads staying whole;
    None without grouped-query attention (one query head per group: the units are the
    heads already) or when the query rows share a layer with others (a fused projection)."""
    per = site.columns.shape[1]
    queries = [n for n, rows in site.producers.items() if rows.shape[1] == per]
    d, U = site.head_dim, site.units
    if len(queries) != 1 or per == d:
        return None

    def regroup(x: torch.Tensor) -> torch.Tensor:  # (U, r*d) -> (r, U*d)
        return x.reshape(U, per // d, d).transpose(0, 1).reshape(per // d, U * d)

    return site.with_(kind="query heads", producers={queries[0]: regroup(
        site.producers[queries[0]])}, columns=regroup(site.columns), counters={})


def _counters(blocks: list[nn.Module], site: Site, per_unit: set[int]) -> dict[str, int]:
    """The integer attributes of the attention module (the producers' common parent)
    that equal, in every block, ``k`` times the site's units for a ``k`` in ``per_unit``
    (heads or channels per unit): {'path.attr': k}."""
    parent = ".".join(next(iter(site.producers)).split(".")[:-1])
    out = {}
    for attr, value in vars(blocks[0].get_submodule(parent)).items():
        if type(value) is not int:
            continue
        for k in sorted(per_unit):
            if value == k * site.units and all(
                    getattr(b.get_submodule(parent), attr, None) == value for b in blocks):
                out[f"{parent}.{attr}" if parent else attr] = k
                break
    return out


def _take(m: nn.Module, idx: torch.Tensor, rows: bool, transposed: bool) -> None:
    """Keep only the output channels (``rows``) or input channels ``idx`` of a linear
    map; its own integer attributes that held the old width (and not the other one),
    such as ``out_features`` or Conv1D's ``nf``, hold the new one."""
    W = m.weight
    dim = (1 if transposed else 0) if rows else (0 if transposed else 1)
    old, other = W.shape[dim], W.shape[1 - dim]
    m.weight = nn.Parameter(W.index_select(dim, idx.to(W.device)).clone(), W.requires_grad)
    if rows and getattr(m, "bias", None) is not None:
        m.bias = nn.Parameter(m.bias[idx.to(W.device)].clone(), m.bias.requires_grad)
    if isinstance(m, nn.Linear):
        m.out_features, m.in_features = m.weight.shape
        return
    if old != other:
        for attr, value in list(vars(m).items()):
            if type(value) is int and value == old:
                setattr(m, attr, len(idx))


def shrink(block: nn.Module, site: Site, keep: torch.Tensor) -> None:
    """Remove, in place, the units of ``site`` not in ``keep`` (U,) bool from ``block``:
    the producers' rows and the consumer's columns are sliced out, and the head-count
    attributes set for the kept units."""
    with torch.no_grad():
        for name, rows in site.producers.items():
            _take(block.get_submodule(name), rows[keep].reshape(-1).sort().values, True,
                  name in site.transposed)
        _take(block.get_submodule(site.consumer), site.columns[keep].reshape(-1).sort().values,
              False, site.consumer in site.transposed)
    kept = int(keep.sum())
    for path, per in site.counters.items():
        owner, _, attr = path.rpartition(".")
        setattr(block.get_submodule(owner) if owner else block, attr, per * kept)


def consumer_weight(block: nn.Module, site: Site) -> torch.Tensor:
    """The consumer's weight as (out, in), whatever its layout."""
    W = block.get_submodule(site.consumer).weight
    return W.T if site.consumer in site.transposed else W


def _macs(block: nn.Module, run: BlockRun) -> float:
    """MACs of one run of the block (attention through the math backend, as counted)."""
    with torch.no_grad(), plain_kernels(block), FlopCounterMode(display=False) as counter:
        run(block)
    return counter.get_total_flops() / 2


def _check(block: nn.Module, run: BlockRun, site: Site, tokens: int) -> Site | str:
    """The site with its unit's MACs per token and parameters, and the head-count
    attributes to lower, when removing every other unit equals zeroing their consumer
    columns; else why not. The candidate attributes match by value only: of the subsets
    that pass, the one with the fewest channel counts (such as GPT-2's ``split_size``) and
    then the most head counts is taken."""
    names = sorted(site.counters)

    def key(subset: tuple[str, ...]) -> tuple[int, int]:
        channels = sum(site.counters[n] >= site.head_dim > 1 for n in subset)
        return channels, -len(subset)

    subsets = sorted((tuple(n for i, n in enumerate(names) if b >> i & 1)
                      for b in range(2 ** len(names))), key=key)
    why = ""
    for subset in subsets:
        trial = site.with_(counters={n: site.counters[n] for n in subset})
        result = _check_one(block, run, trial, tokens)
        if isinstance(result, Site):
            return result
        why = why or result
    return why


def _check_one(block: nn.Module, run: BlockRun, site: Site, tokens: int) -> Site | str:
    """:func:`_check` with the site's attributes as they are, removing every other unit
    and (from three units) only the last."""
    keeps = [torch.arange(site.units) % 2 == 0]
    if site.units >= 3:
        keeps.append(torch.arange(site.units) < site.units - 1)
    result: Site | str = site
    for keep in keeps:
        result = _check_keep(block, run, site, tokens, keep)
        if isinstance(result, str):
            return result
    return result


def _check_keep(block: nn.Module, run: BlockRun, site: Site, tokens: int,
                keep: torch.Tensor) -> Site | str:
    """:func:`_check_one` for one choice of kept units ``keep`` (U,) bool."""
    cols = site.columns[~keep].reshape(-1)
    zero = torch.zeros(consumer_weight(block, site).shape[1], dtype=torch.bool)
    zero[cols] = True

    def masked(mod, args):
        return (args[0] * (~zero).to(args[0].dtype),)

    want = block_output(_run_hooked(block, run, [
        block.get_submodule(site.consumer).register_forward_pre_hook(masked)]))
    cut = copy.deepcopy(block)
    shrink(cut, site, keep)
    try:
        with torch.no_grad():
            got = block_output(run(cut))
    except Exception as e:  # the model's code does not allow fewer units here
        return f"{type(e).__name__}: {e}"
    scale = float(want.abs().amax()) + 1e-30
    if got.shape != want.shape or float((got - want).abs().amax()) > 10 * TOLERANCE * scale:
        return "removing units is not the same as zeroing them"
    removed = int((~keep).sum())
    params = sum(p.numel() for p in block.parameters()) - sum(p.numel()
                                                              for p in cut.parameters())
    macs = (_macs(block, run) - _macs(cut, run)) / removed / tokens
    return site.with_(macs=macs, params=params // removed)


def _attention_counters(blocks: list[nn.Module], site: Site, segments: list[Segment]
                        ) -> dict[str, int]:
    """The candidate head-count attributes of an attention site: multiples of its units by
    a segment's heads or channels per unit (a query head site: by the number of groups,
    heads or channels, and 1 for the group size)."""
    d, U = site.head_dim, site.units
    if site.kind == "query heads":
        groups = site.columns.shape[1] // d
        return _counters(blocks, site, {1, groups, groups * d})
    widths = {width for _, _, width in segments}
    return _counters(blocks, site, {w // d // U for w in widths} | {w // U for w in widths})


def find_sites(blocks: list[nn.Module], run: BlockRun, tokens: int, seed: int = 0,
               attention_units: str = "groups") -> tuple[list[Site], dict[str, str]]:
    """The checked sites of the blocks (found on the first, checked on the first and the
    last) and {site: why it is left whole} for those that failed the check. ``run(block)``
    runs a block on the probe of ``tokens`` tokens; ``attention_units``: 'groups' (a
    key/value head with its query heads) or 'heads' (the same query head of every group,
    where the attention has groups of several query heads)."""
    first = blocks[0]
    gen = torch.Generator().manual_seed(seed)
    lin = linears(first, run)
    types = tuple({type(x.module) for x in lin.values()})
    segments = head_segments(first, None, lambda m, _: run(m), types) if lin else {}
    base = _inputs(first, run, lin)
    sites = _mlp_sites(first, run, lin, base, {n for n, _, _ in segments}, gen)
    groups: dict[tuple[str, int], list[Segment]] = {}
    for seg, d in segments.items():
        groups.setdefault((seg[0].rpartition(".")[0], d), []).append(seg)
    for (_, d), segs in groups.items():
        s = _attention_site(first, run, lin, base, sorted(segs), d)
        if s is not None and attention_units == "heads":
            s = query_heads(s) or s
        if s is not None:
            sites.append(s.with_(counters=_attention_counters(blocks, s, segs)))
    checked, dropped = [], {}
    for s in sites:
        if s.units < 2:
            dropped[s.label()] = "a single unit: nothing to remove"
            continue
        result = _check(first, run, s, tokens)
        if isinstance(result, Site) and len(blocks) > 1:
            again = _check_one(blocks[-1], run, result, tokens)
            result = again if isinstance(again, str) else result
        if isinstance(result, str):
            dropped[s.label()] = result
        else:
            checked.append(result)
    return checked, dropped
