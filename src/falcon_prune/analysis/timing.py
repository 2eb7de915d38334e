"""A lookup table of measured layer times: the latency of a channel choice (``latency=``).

FLOPs say little about speed on a CPU. A convolution's kernel changes with its channel
counts (blocked layouts of 8 or 16 channels, different algorithms), so its time moves in
steps: on a 2-core AVX-512 CPU a 3x3 convolution on 32 x 32 maps at batch 64 took 6.6 ms
with 16 input and 16 output channels and 2.3 ms with 12 and 12. A model linear in the
channels misses such steps, so this module measures instead, on the device the pruning
runs on and at the deployment batch size:

- ``total``: the dense network's forward time (median of interleaved repeats);
- each Linear, ungrouped or depthwise convolution among the prunable layers: its time
  inside the dense network (forward hooks, interleaved with the plain runs), and its time
  at the (output, input) channel counts a choice leaves it: that figure times the ratio of
  the layer timed alone at those counts to the layer timed alone at full width (the two
  interleaved, on the input it receives in the network), measured the first time a count
  pair is asked for and kept (the lookup table);
- the rest (normalisations, activations, additions, pooling, layers that are not sliced,
  and the per-call overhead of eager execution): ``total`` minus the layers' times, kept
  whole (on ResNet20 at batch 64 a network with 12 of the first stage's 16 residual
  channels spent 12-14 ms outside its convolutions against 13-16 ms for the dense one,
  measured with the same hooks: it shrinks, but far less than the channels).

The table maps the units a choice removes (per coupled group) to the layers' widths
through the units' weights: a unit owns whole rows of a layer's weight (an output channel)
or whole columns (an input channel). A sum of layer times misses what the rest saves and
how layers behave together, so the table is calibrated once: a copy of the network with
half of every group's channels is built and measured against the dense one, and the
table's predicted saving is scaled to match it. ``prune`` also measures the pruned network
against the dense one at the end and reports both (``details['latency']``).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from falcon_prune.analysis.costs import CostModel
from falcon_prune.analysis.structure import ChannelUnits
from falcon_prune.data.batches import Batch, batch_size, concat, take

#: interleaved repeats of every timing (their median is taken)
LATENCY_REPEATS = 7
#: the most extra stages a run adds while the measured latency is above the budget
LATENCY_ROUNDS = 2


def latency_batch(probe: Batch, batch: int) -> Batch:
    """``batch`` samples made by repeating the samples of ``probe`` (a latency depends on
    the shapes, not on the values)."""
    n = batch_size(probe)
    return take(concat([probe] * -(-batch // n)), slice(0, batch))


def _timer(fn: Callable[[], object], sync: Callable[[], None], calls: int) -> float:
    """Seconds per call of ``fn`` over ``calls`` calls."""
    sync()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - t) / calls


def interleaved_seconds(runs: dict[str, Callable[[], object]], repeats: int,
                        device: torch.device, repeat_seconds: float = 0.004
                        ) -> dict[str, float]:
    """{name: median seconds per call} of the zero-argument ``runs``, each timed in turn
    inside every one of ``repeats`` repeats (after 2 warm-up rounds); a repeat times enough
    calls to last about ``repeat_seconds``."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        for _ in range(2):
            for fn in runs.values():
                fn()
        calls = {k: max(1, round(repeat_seconds / max(_timer(fn, sync, 1), 1e-7)))
                 for k, fn in runs.items()}
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(repeats):
            for k, fn in runs.items():
                times[k].append(_timer(fn, sync, calls[k]))
    return {k: statistics.median(v) for k, v in times.items()}


def side_by_side(call: Callable, inputs: Batch, dense: nn.Module, small: nn.Module,
                 device: torch.device) -> dict:
    """The seconds per forward of ``small`` as a fraction of ``dense``'s on ``inputs``
    (each run by ``call(model, inputs)``), both run in turn in every repeat (median of
    ``2 x LATENCY_REPEATS``), with both times in ms."""
    secs = interleaved_seconds({"dense": lambda: call(dense, inputs),
                                "pruned": lambda: call(small, inputs)},
                               LATENCY_REPEATS * 2, device)
    return {"measured_fraction": secs["pruned"] / secs["dense"],
            "dense_ms": secs["dense"] * 1e3, "pruned_ms": secs["pruned"] * 1e3}


def sliceable(module: nn.Module) -> bool:
    """A Linear, an ungrouped convolution or a depthwise one: its channels can be cut by
    slicing its weight."""
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.transposed:
            return False
        return module.groups == 1 or module.groups == module.in_channels == module.out_channels
    return type(module) is nn.Linear


def sliced(module: nn.Module, x: torch.Tensor, co: int, ci: int
           ) -> tuple[nn.Module, torch.Tensor]:
    """A copy of a :func:`sliceable` ``module`` with ``co`` output and ``ci`` input
    channels (a depthwise convolution: ``co`` of both), and its input ``x`` cut to
    match (channels are dimension 1 of a convolution's input, the last of a Linear's)."""
    thin = copy.copy(module)
    thin._parameters = dict(module._parameters)
    depthwise = isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1
    ci = co if depthwise else ci
    thin.weight = nn.Parameter(module.weight.detach()[:co, :ci].clone(), requires_grad=False)
    if module.bias is not None:
        thin.bias = nn.Parameter(module.bias.detach()[:co].clone(), requires_grad=False)
    if isinstance(module, nn.Linear):
        thin.out_features, thin.in_features = co, ci
        return thin, x[..., :ci].contiguous()
    thin.out_channels, thin.in_channels = co, ci
    if depthwise:
        thin.groups = co
    return thin, x[:, :ci].contiguous()


@dataclass
class _Layer:
    """A sliced layer: its module and captured input, calls per forward, full widths,
    and the groups whose dead units remove its output rows or input columns
    ([(group, channels per unit)])."""

    module: nn.Module
    x: torch.Tensor
    calls: int
    out_full: int
    in_full: int
    out_terms: list[tuple[int, int]] = field(default_factory=list)
    in_terms: list[tuple[int, int]] = field(default_factory=list)
    depthwise: bool = False

    def widths(self, dead: list[int]) -> tuple[int, int]:
        """(output, input) channels left when ``dead[g]`` units of group g are removed
        (a depthwise convolution's input channels are its outputs)."""
        co = self.out_full - sum(dead[g] * n for g, n in self.out_terms)
        ci = self.in_full - sum(dead[g] * n for g, n in self.in_terms)
        return (co, co) if self.depthwise else (co, ci)


def _unit_terms(units: ChannelUnits, cm: CostModel, layers: dict[str, _Layer]) -> None:
    """Fill each layer's ``out_terms``/``in_terms`` from the first unit of every group:
    the rows or columns of the layer's weight that the unit owns whole. A layer a unit
    touches in any other way is left out of the table (its time counts as the rest)."""
    offsets = torch.tensor(cm.offsets, dtype=torch.int64)
    index = {lay.name: k for k, lay in enumerate(cm.layers)}
    for g in range(len(units.groups)):
        first = (units.group == g).nonzero().reshape(-1)
        if not len(first):
            continue
        u = int(first[0])
        flat = units.space.flat[units.entries[units.ptr[u]:units.ptr[u + 1]]]
        flat = flat[flat >= 0]
        which = torch.searchsorted(offsets, flat, right=True) - 1
        for k in torch.unique(which).tolist():
            lay = cm.layers[k]
            name = lay.name.rpartition(".")[0]
            if name not in layers or index.get(name + ".weight") != k:
                continue
            local = flat[which == k] - cm.offsets[k]
            per = lay.numel // lay.shape[0]
            kernel = per // lay.shape[1] if len(lay.shape) > 1 else 1
            rows = torch.unique(local // per)
            cols = torch.unique((local % per) // kernel)
            if len(local) == len(rows) * per:
                layers[name].out_terms.append((g, len(rows)))
            elif len(local) == len(cols) * lay.shape[0] * kernel:
                layers[name].in_terms.append((g, len(cols)))
            else:
                layers.pop(name)


class LatencyTable:
    """Predicted seconds per forward of a channel choice of one model at one batch.

    ``total``: the dense network (measured). Each sliced layer's time inside the dense
    network is measured with hooks (``inside``, seconds per call); its time at other widths
    is that figure times the ratio of the layer timed alone at those widths to the layer
    timed alone at full width, the two interleaved (a ratio holds when the machine's speed
    drifts between measurements, and a layer inside the network is not timed like one
    alone). ``raw_seconds(dead)`` for ``dead`` (G,) units removed per group adds every
    layer's time at the widths left and ``base``, the time outside the sliced layers;
    ``seconds(dead)`` scales its saving on the dense time by ``scale``, calibrated on one
    physically pruned network (:meth:`calibrate`)."""

    def __init__(self, model: nn.Module, units: ChannelUnits, cm: CostModel, inputs: Batch,
                 call: Callable, device: torch.device, repeats: int = LATENCY_REPEATS):
        self.device, self.repeats = device, repeats
        self.layers = _capture(model, cm, lambda: call(model, inputs))
        _unit_terms(units, cm, self.layers)
        self.total, inside = inside_seconds(
            model, call, inputs, {k: lay.module for k, lay in self.layers.items()}, repeats,
            device)
        self.table: dict[tuple[str, int, int], float] = {
            (k, lay.out_full, lay.in_full): inside[k] / lay.calls
            for k, lay in self.layers.items()}
        self.base = self.total - sum(inside.values())
        self.scale = 1.0

    def layer_seconds(self, name: str, co: int, ci: int) -> float:
        """Seconds per call of layer ``name`` inside the network with ``co`` output and
        ``ci`` input channels (0 when either is 0), measured once."""
        if co <= 0 or ci <= 0:
            return 0.0
        key = (name, co, ci)
        if key not in self.table:
            lay = self.layers[name]
            thin, x = sliced(lay.module, lay.x, co, ci)
            full, xf = sliced(lay.module, lay.x, lay.out_full, lay.in_full)
            secs = interleaved_seconds({"thin": lambda: thin(x), "full": lambda: full(xf)},
                                       self.repeats, self.device)
            inside = self.table[(name, lay.out_full, lay.in_full)]
            self.table[key] = inside * secs["thin"] / max(secs["full"], 1e-12)
        return self.table[key]

    def raw_seconds(self, dead: list[int]) -> float:
        """The sum of the table: ``base`` and every sliced layer's time at the widths that
        ``dead[g]`` units removed per group leave."""
        t = self.base
        for name, lay in self.layers.items():
            co, ci = lay.widths(dead)
            t += lay.calls * self.layer_seconds(name, co, ci)
        return t

    def seconds(self, dead: list[int]) -> float:
        """Predicted seconds per forward with ``dead[g]`` units of group g removed: the
        table's saving on the dense time times ``scale`` (:meth:`calibrate`)."""
        return self.total - self.scale * (self.total - self.raw_seconds(dead))

    def calibrate(self, dead: list[int], measured: float) -> None:
        """Set ``scale`` so that the choice ``dead`` is predicted at ``measured`` (its
        time as a fraction of the dense network's, measured side by side): the table's
        savings are then scaled by what one real network saved (within [0.5, 2])."""
        saved = 1.0 - self.raw_seconds(dead) / self.total
        if saved > 0.05:
            self.scale = min(2.0, max(0.5, (1.0 - measured) / saved))


def inside_seconds(model: nn.Module, call: Callable, inputs: Batch,
                   layers: dict[str, nn.Module], repeats: int, device: torch.device
                   ) -> tuple[float, dict[str, float]]:
    """(seconds per forward of the network, {name: the seconds per forward spent inside
    module ``layers[name]``}): the network timed plainly, interleaved with forwards whose
    hooks time each module (medians of ``repeats``)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    spent = dict.fromkeys(layers, 0.0)
    per_forward: dict[str, list[float]] = {k: [] for k in layers}
    started: dict[str, float] = {}
    on = [False]

    def before(name):
        def fn(mod, args):
            if on[0]:
                sync()
                started[name] = time.perf_counter()
        return fn

    def after(name):
        def fn(mod, args, out):
            if on[0]:
                sync()
                spent[name] += time.perf_counter() - started[name]
        return fn

    def hooked():
        for k in spent:
            spent[k] = 0.0
        on[0] = True
        call(model, inputs)
        on[0] = False
        for k, v in spent.items():
            per_forward[k].append(v)

    handles = [h for k, module in layers.items() for h in (
        module.register_forward_pre_hook(before(k)),
        module.register_forward_hook(after(k)))]
    try:
        secs = interleaved_seconds({"network": lambda: call(model, inputs), "hooked": hooked},
                                   repeats, device)
    finally:
        for h in handles:
            h.remove()
    # the first three hooked forwards warmed up and sized the repeats
    return secs["network"], {k: statistics.median(v[3:]) for k, v in per_forward.items()}


def _capture(model: nn.Module, cm: CostModel, run: Callable[[], object]) -> dict[str, _Layer]:
    """One forward pass with hooks on the sliceable modules that own a prunable weight:
    {module name: _Layer} with the input of its last call and its number of calls."""
    names = {lay.name.rpartition(".")[0] for lay in cm.layers if lay.name.endswith(".weight")}
    modules = {n: m for n, m in model.named_modules() if n in names and sliceable(m)}
    seen: dict[str, list] = {}

    def hook(name):
        def fn(mod, args, kwargs, out):
            entry = seen.setdefault(name, [None, 0])
            ok = not kwargs and len(args) == 1 and isinstance(args[0], torch.Tensor)
            entry[0] = args[0].detach() if ok else False if entry[0] is None else entry[0]
            entry[1] += 1
        return fn

    handles = [m.register_forward_hook(hook(k), with_kwargs=True) for k, m in modules.items()]
    try:
        with torch.inference_mode():
            run()
    finally:
        for h in handles:
            h.remove()
    out = {}
    for k, (x, calls) in seen.items():
        if isinstance(x, torch.Tensor):
            w = modules[k].weight
            depthwise = isinstance(modules[k], nn.modules.conv._ConvNd) and modules[k].groups > 1
            out[k] = _Layer(modules[k], x, calls, w.shape[0],
                            w.shape[0] if depthwise else w.shape[1], depthwise=depthwise)
    return out
