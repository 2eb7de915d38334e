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
:func:`~falcon_prune.analysis.structure.head_sizes` sees which linear outputs are split
into heads, and then with some output channels of one layer set to zero: a layer B
*reads* the channels of a layer A when zeroing a set S of A's channels changes exactly the
columns S of B's input (an MLP), or, for a layer split into heads, when zeroing one head
changes exactly some whole heads of B's input (one for a query head, a group of them for a
key or value head under grouped-query attention). The groups are the model's own, not an
assumed ``h // n_rep`` rule.

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
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from falcon_prune.analysis.costs import plain_kernels
from falcon_prune.analysis.structure import head_sizes

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

    @property
    def units(self) -> int:
        return len(self.columns)

    def label(self) -> str:
        return f"{self.kind} ({self.consumer}, {self.units} units)"


def block_output(y: object) -> torch.Tensor:
    """The hidden states a block returns (the first element of a tuple)."""
    return y if isinstance(y, torch.Tensor) else y[0]


def _linears(block: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}


def _inputs(block: nn.Module, run: BlockRun, zero: dict[str, torch.Tensor] | None = None
            ) -> dict[str, torch.Tensor]:
    """{layer: its input rows (tokens, d) at its first call} for every linear layer of the
    block, run with the output channels ``zero[name]`` (bool (out,)) of layers set to 0."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name, m in _linears(block).items():
        def pre(module, args, name=name):
            seen.setdefault(name, args[0].detach().reshape(-1, args[0].shape[-1]).clone())
        handles.append(m.register_forward_pre_hook(pre))
        if zero and name in zero:
            keep = (~zero[name]).to(m.weight.dtype)
            handles.append(m.register_forward_hook(lambda mod, a, out, k=keep: out * k))
    try:
        with torch.no_grad():
            run(block)
    finally:
        for h in handles:
            h.remove()
    return seen


def _changed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(d,) bool: the columns where inputs ``a`` and ``b`` (tokens, d) differ."""
    scale = float(a.abs().amax()) + 1e-30
    return (a.double() - b.double()).abs().amax(0) > TOLERANCE * scale


def _mlp_sites(block: nn.Module, run: BlockRun, base: dict, heads: dict,
               gen: torch.Generator) -> list[Site]:
    """The MLP sites: layers whose zeroed channels S change exactly the columns S of a
    consumer's input."""
    lin = _linears(block)
    found: dict[str, list[str]] = {}
    for p, P in lin.items():
        readers = [r for r, R in lin.items() if r != p and r not in heads and r in base
                   and R.in_features == P.out_features]
        if p in heads or not readers or P.out_features < 2:
            continue
        S = torch.rand(P.out_features, generator=gen) < 0.5
        S[0], S[-1] = True, False
        got = _inputs(block, run, {p: S})
        for r in readers:
            if torch.equal(_changed(base[r], got[r]), S):
                found.setdefault(r, []).append(p)
    sites = []
    for r, ps in found.items():
        idx = torch.arange(lin[r].in_features)[:, None]
        sites.append(Site("mlp", {p: idx for p in ps}, r, idx))
    return sites


def _head_map(block: nn.Module, run: BlockRun, base: dict, layer: str, d: int,
              reader: str) -> list[frozenset[int]] | None:
    """For each head of ``layer`` (head size d), the heads of ``reader``'s input that
    change when it is zeroed; None unless they are whole, non-empty heads."""
    out = []
    n = _linears(block)[layer].out_features // d
    for j in range(n):
        S = torch.zeros(n * d, dtype=torch.bool)
        S[j * d:(j + 1) * d] = True
        ch = _changed(base[reader], _inputs(block, run, {layer: S})[reader]).reshape(-1, d)
        whole = ch.all(1)
        if not whole.any() or not torch.equal(whole, ch.any(1)):
            return None
        out.append(frozenset(whole.nonzero().reshape(-1).tolist()))
    return out


def _partition(maps: dict[str, list[frozenset[int]]], n: int) -> list[list[int]] | None:
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


def _attention_site(block: nn.Module, run: BlockRun, base: dict, layers: list[str],
                    d: int) -> Site | None:
    """The site of the head-split ``layers`` of one attention (head size d) and the one
    layer that reads all of their heads as whole heads."""
    lin = _linears(block)
    for r, R in lin.items():
        if r in layers or r not in base or R.in_features % d:
            continue
        maps = {}
        for p in layers:
            m = _head_map(block, run, base, p, d, r)
            if m is None:
                break
            maps[p] = m
        else:
            units = _partition(maps, R.in_features // d)
            if units is None:
                continue
            rows = {}
            for p, sets in maps.items():
                per = [[j for j, s in enumerate(sets) if s <= set(u)] for u in units]
                if len({len(x) for x in per}) != 1:
                    return None
                heads = torch.tensor(per)  # (U, heads of p per unit)
                rows[p] = (heads[..., None] * d + torch.arange(d)).reshape(len(units), -1)
            cols = torch.tensor(units)
            cols = (cols[..., None] * d + torch.arange(d)).reshape(len(units), -1)
            return Site("attention", rows, r, cols)
    return None


def _counters(blocks: list[nn.Module], site: Site, d: int) -> dict[str, int]:
    """The integer attributes of the attention module (the producers' common parent)
    that equal a producer's head count in every block: {'path.attr': heads per unit}."""
    parent = ".".join(next(iter(site.producers)).split(".")[:-1])
    per_unit = {len(rows[0]) // d for rows in site.producers.values()}
    out = {}
    for attr, value in vars(blocks[0].get_submodule(parent)).items():
        if type(value) is not int:
            continue
        for k in per_unit:
            if value == k * site.units and all(
                    getattr(b.get_submodule(parent), attr, None) == value for b in blocks):
                out[f"{parent}.{attr}" if parent else attr] = k
    return out


def shrink(block: nn.Module, site: Site, keep: torch.Tensor) -> None:
    """Remove, in place, the units of ``site`` not in ``keep`` (U,) bool from ``block``:
    the producers' rows and the consumer's columns are sliced out, and the head-count
    attributes set for the kept units."""
    with torch.no_grad():
        for name, rows in site.producers.items():
            m = block.get_submodule(name)
            idx = rows[keep].reshape(-1).sort().values.to(m.weight.device)
            m.weight = nn.Parameter(m.weight[idx].clone(), m.weight.requires_grad)
            if m.bias is not None:
                m.bias = nn.Parameter(m.bias[idx].clone(), m.bias.requires_grad)
            m.out_features = len(idx)
        c = block.get_submodule(site.consumer)
        idx = site.columns[keep].reshape(-1).sort().values.to(c.weight.device)
        c.weight = nn.Parameter(c.weight[:, idx].clone(), c.weight.requires_grad)
        c.in_features = len(idx)
    kept = int(keep.sum())
    for path, per in site.counters.items():
        owner, _, attr = path.rpartition(".")
        setattr(block.get_submodule(owner) if owner else block, attr, per * kept)


def _macs(block: nn.Module, run: BlockRun) -> float:
    """MACs of one run of the block (attention through the math backend, as counted)."""
    with torch.no_grad(), plain_kernels(block), FlopCounterMode(display=False) as counter:
        run(block)
    return counter.get_total_flops() / 2


def _check(block: nn.Module, run: BlockRun, site: Site, tokens: int) -> Site | str:
    """The site with its unit's MACs per token and parameters, and the head-count
    attributes to lower, when removing every other unit equals zeroing their consumer
    columns; else why not. Of the candidate attributes (which match by value only), the
    largest subset that passes is taken."""
    names = sorted(site.counters)
    subsets = sorted((tuple(n for i, n in enumerate(names) if b >> i & 1)
                      for b in range(2 ** len(names))), key=len, reverse=True)
    why = ""
    for subset in subsets:
        trial = Site(site.kind, site.producers, site.consumer, site.columns,
                     {n: site.counters[n] for n in subset})
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
    zero = torch.zeros(block.get_submodule(site.consumer).in_features, dtype=torch.bool)
    zero[cols] = True

    def masked(mod, args):
        return (args[0] * (~zero).to(args[0].dtype),)

    h = block.get_submodule(site.consumer).register_forward_pre_hook(masked)
    try:
        with torch.no_grad():
            want = block_output(run(block))
    finally:
        h.remove()
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
    return Site(site.kind, site.producers, site.consumer, site.columns, site.counters,
                macs, params // removed)


def find_sites(blocks: list[nn.Module], run: BlockRun, tokens: int, seed: int = 0
               ) -> tuple[list[Site], dict[str, str]]:
    """The checked sites of the blocks (found on the first, checked on the first and the
    last) and {site: why it is left whole} for those that failed the check. ``run(block)``
    runs a block on the probe of ``tokens`` tokens."""
    first = blocks[0]
    gen = torch.Generator().manual_seed(seed)
    heads = head_sizes(first, None, lambda m, _: run(m))
    base = _inputs(first, run)
    sites = _mlp_sites(first, run, base, heads, gen)
    parents: dict[tuple[str, int], list[str]] = {}
    for name, d in heads.items():
        parents.setdefault((name.rpartition(".")[0], d), []).append(name)
    for (_, d), layers in parents.items():
        s = _attention_site(first, run, base, sorted(layers), d)
        if s is not None:
            sites.append(Site(s.kind, s.producers, s.consumer, s.columns,
                              _counters(blocks, s, d)))
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
