"""Layer-wise pruning: the pipeline behind ``prune`` with the layer-wise loss model.

1. Set up: a plain copy of the model (in its own dtype, where it is), its repeated blocks,
   the prunable set (the blocks' linear layers), the calibration sequences, and the cost
   model probed on one sequence (MACs per token; the fixed MACs of attention reported).
2. Allocate: with ``allocation='ilp'``, measure how much the loss feels each layer's
   output error (its sensitivity, from checkpointed backward passes on a few sequences),
   then run the dense model block by block and measure every layer's error curve (OBS
   sweeps to a grid of kept counts), weighted by the sensitivity; the knapsack chooses
   each layer's count under both budgets, with its certificate. 'uniform' gives every
   layer the same density, 'owl' more to blocks with more outlier features; an n:m
   ``pattern`` fixes every layer.
3. Prune block by block (the sequential protocol): each layer is solved on the Gram of its
   inputs from the already pruned blocks before it. With ``passes=2`` the curves are
   measured again on those inputs and, when the knapsack then chooses other counts, the
   blocks are pruned again from the dense weights with them.
4. Verify the budgets through the independent recount. The pruned weights are plain zeros,
   without prune masks (which would double a large model's memory).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from falcon_prune.analysis.blocks import Blocks, find_blocks, move_outside, outside
from falcon_prune.analysis.costs import CostModel
from falcon_prune.analysis.masks import clone_model, make_permanent
from falcon_prune.config import PruneConfig
from falcon_prune.data.batches import Samples, collect
from falcon_prune.errors import BudgetError, ConfigError, ModelError
from falcon_prune.loss.distributed import Ranks, require_same_model
from falcon_prune.loss.layerwise import Grams
from falcon_prune.loss.sensitivity import output_sensitivity
from falcon_prune.methods import get_method
from falcon_prune.methods.reconstruction import relative_error
from falcon_prune.methods.sparsegpt import error_curve, n_m
from falcon_prune.results import PruneResult, peak_rss_mb
from falcon_prune.runs.sequential import Stream, capture, linear_layers, run_blocks
from falcon_prune.runs.setup import check_model, check_task
from falcon_prune.selection.allocation import Allocation, Curve, allocate, outlier_weighted, uniform
from falcon_prune.spaces.weights import WeightSpace

#: calibration sequences run through a block together
CALIBRATION_BATCH = 8
#: kept fractions of the error curves' grid (with the least each layer keeps, and all)
GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))
#: an input feature is an outlier of a layer when |w| x its norm is this many times the mean
OWL_THRESHOLD = 5.0
#: calibration sequences the dense error curves are measured on (their first ones): the
#: curves only rank the layers' densities, and need fewer tokens than the pruning itself
CURVE_SEQUENCES = 32
#: calibration sequences the layers' sensitivities are measured on (one at a time)
SENSITIVITY_SEQUENCES = 16


@dataclass(kw_only=True)
class BlockRun:
    """What the passes of one run over a model's blocks share (weights or units)."""

    work: nn.Module
    blocks: Blocks
    config: PruneConfig
    samples: Samples
    first: int
    device: torch.device
    ranks: Ranks
    progress: bool
    probe: object
    times: dict = field(default_factory=dict)
    rows: dict = field(default_factory=dict)
    #: each layer's sensitivity (the weight of its errors in the allocation); 1 until
    #: measured
    sensitivity: dict[str, float | torch.Tensor] = field(default_factory=dict)

    def layers(self, i: int, block: nn.Module) -> dict[str, nn.Module]:
        """{full name: module} of the layers of block i whose input Grams the run needs."""
        raise NotImplementedError

    def batches(self, sequences: int | None, size: int) -> list:
        """This process's calibration batches of ``size`` sequences: of all its sequences,
        or of those among the first ``sequences`` of every process's (so that any number
        of processes measures on the same sequences)."""
        mine = self.samples
        if sequences is not None:
            mine = mine.take(slice(0, max(0, min(len(mine), sequences - self.first))))
        return list(mine.chunks(size))

    def stream(self, sequences: int | None = None) -> Stream:
        """This process's calibration batches (see :meth:`batches`) caught at the first
        block."""
        batches = [self.config.task.inputs(b) for b in self.batches(sequences,
                                                                       CALIBRATION_BATCH)]
        return capture(self.work, self.blocks, batches, self.config.task.call, self.device)

    def measure_sensitivity(self, per_output: bool = False) -> None:
        """The sensitivity of every layer of :meth:`layers` on the dense model, from the
        first SENSITIVITY_SEQUENCES calibration sequences (keys: ``name.weight``; one
        number per layer, or with ``per_output`` one per output feature)."""
        t = time.perf_counter()
        modules = {name: module for i, block in enumerate(self.blocks.modules)
                   for name, module in self.layers(i, block).items()}
        s = output_sensitivity(self.work, self.blocks, modules,
                               self.batches(SENSITIVITY_SEQUENCES, 1), self.config.task,
                               self.device, self.ranks, self.progress, per_output)
        self.sensitivity = {name + ".weight": value for name, value in s.items()}
        self.times["sensitivity"] = time.perf_counter() - t


@dataclass(kw_only=True)
class Layerwise(BlockRun):
    """A layer-wise run over single weights: the cost model and weight space too."""

    cm: CostModel
    space: WeightSpace

    def layers(self, i: int, block: nn.Module) -> dict[str, nn.Module]:
        names = {lay.name for lay in self.cm.layers}
        return linear_layers(block, f"{self.blocks.path}.{i}", names)


def _prunable_selector(blocks: Blocks, cfg: PruneConfig):
    """The run's ``exclude``: what the user excludes, and everything outside the blocks."""
    if cfg.exclude is None:
        return outside(blocks)
    more = list(cfg.exclude) if isinstance(cfg.exclude, (list, tuple)) else [cfg.exclude]
    return [outside(blocks), *more]


def setup(model: nn.Module, data: object, flops: float | None, nnz: float | None,
          cfg: PruneConfig, progress: bool) -> tuple[Layerwise, object]:
    """Check the model, copy it, find its blocks, draw the calibration sequences, probe
    the cost model and build the weight space; returns the run and the final budget."""
    if flops is None and nnz is None and cfg.pattern is None:
        raise BudgetError("give at least one budget: flops=<fraction kept> and/or "
                          "nnz=<fraction>, or a pattern such as pattern='2:4'")
    check_model(model)
    device = torch.device(cfg.device)
    work = make_permanent(clone_model(model)).eval()
    blocks = find_blocks(work, cfg.blocks)
    if cfg.include is not None:
        raise ConfigError("the layer-wise loss model prunes the linear layers inside the "
                          "blocks; include= cannot add others (use exclude= to keep some "
                          "dense, or loss_model='global')")
    ranks = Ranks.current()
    require_same_model(ranks, work)
    drawn = collect(data, cfg.n_calibration, cfg.seed, cfg.sampling).samples
    probe = cfg.task.inputs(drawn.take(slice(0, 1)).batch)
    check_task(work, drawn, cfg.task, torch.device("cpu"), count=1)
    exclude = _prunable_selector(blocks, cfg)
    cm = CostModel.from_model(work, probe, cfg.task.call, None, exclude)
    cfg = cfg.replace(exclude=exclude, sampling=cfg.sampling or "random")
    first, last = ranks.bounds(len(drawn))
    space = WeightSpace(cm, cfg)
    final = space.budget(flops, nnz)
    space.check(final)
    run = Layerwise(work=work, blocks=blocks, cm=cm, space=space, config=cfg,
                    samples=drawn.take(slice(first, last)), first=first, device=device,
                    ranks=ranks, progress=progress and ranks.is_main, probe=probe)
    return run, final


def _grid(lay, least: int, target: float) -> list[int]:
    """The counts of a layer's error curve: its least, the grid near ``target`` (within
    0.3 of it), and all of its weights."""
    n = lay.numel
    counts = {least, n} | {max(least, int(g * n)) for g in GRID if abs(g - target) <= 0.3}
    return sorted(c for c in counts if least <= c <= n)


def _curve(run: Layerwise, lay, W: torch.Tensor, H: torch.Tensor, least: int,
           target: float) -> Curve:
    """A layer's error curve: the error of sweeps to the counts of its grid, times the
    layer's sensitivity (an estimate of the loss they add)."""
    kept = _grid(lay, least, target)
    weight = run.sensitivity.get(lay.name, 1.0)
    errors = [e * weight for e in error_curve(W, H, kept, run.config.damp)]
    return Curve(lay.name, lay.numel, lay.cost, kept, errors)


def measure_curves(run: Layerwise, target: float, stream: Stream | None = None
                   ) -> tuple[list[Curve], dict]:
    """Every layer's error curve (weighted by its sensitivity) and every block's share of
    outlier features, from one run of the blocks; dense unless ``stream`` comes from
    already pruned blocks."""
    floors = dict(zip([lay.name for lay in run.cm.layers], run.space.floors(), strict=True))
    by_name = {lay.name: lay for lay in run.cm.layers}
    curves, outliers, groups = [], {}, {}

    def work(i: int, block: nn.Module, grams: Grams) -> bool:
        hits = total = 0
        for name, module in grams.layers.items():
            lay, H = by_name[name + ".weight"], grams.gram(name)
            W = module.weight.detach()
            curves.append(_curve(run, lay, W, H, floors[lay.name], target))
            score = W.abs().double() * H.diagonal().clamp_min(0).sqrt()
            hits += int((score > OWL_THRESHOLD * score.mean()).sum())
            total += score.numel()
            groups[lay.name] = i
        outliers[i] = hits / max(1, total)
        return False

    stream = stream or run.stream(CURVE_SEQUENCES)
    run_blocks(run.blocks, stream, run.layers, work, run.ranks, run.device,
               "error curves", run.progress)
    return curves, {"outliers": outliers, "groups": groups}


def _counts(run: Layerwise, final, stats_of) -> tuple[dict[str, int] | None,
                                                     Allocation | None]:
    """Each layer's kept count (None with a pattern) and, for 'ilp', the allocation."""
    cfg = run.config
    if cfg.pattern is not None:
        return None, None
    target = min(x for x in (final.count / run.cm.num_weights if final.count else 1.0,
                             final.cost / run.cm.dense_macs if final.cost else 1.0))
    if cfg.allocation == "uniform":
        floors = run.space.floors()
        curves = [Curve(lay.name, lay.numel, lay.cost, [f, lay.numel], [1.0, 0.0])
                  for lay, f in zip(run.cm.layers, floors, strict=True)]
        return uniform(curves, final.cost, final.count), None
    if cfg.allocation == "ilp":
        run.measure_sensitivity()
    t = time.perf_counter()
    curves, stats = stats_of(target)
    run.times["curves"] = run.times.get("curves", 0.0) + time.perf_counter() - t
    if cfg.allocation == "owl":
        return outlier_weighted(curves, stats["groups"], stats["outliers"], final.cost,
                                final.count), None
    result = allocate(curves, final.cost, final.count)
    return result.kept, result


def _solve_layer(run: Layerwise, module: nn.Module, lay, H: torch.Tensor, count: int | None
                 ) -> None:
    """Prune one layer in place with the method's layer solver (the same weights on every
    process) and record its row of the report."""
    cfg = run.config
    pattern = n_m(cfg.pattern) if cfg.pattern else None
    W = module.weight.detach()
    W_hat, keep = get_method(cfg.method).layerwise(W, H, count, pattern, cfg)
    W_hat = run.ranks.broadcast((W_hat * keep).to(W.dtype).contiguous())
    keep = run.ranks.broadcast(keep.contiguous())
    run.rows[lay.name] = {"layer": lay.name, "weights": lay.numel, "kept": int(keep.sum()),
                          "density": float(keep.sum()) / lay.numel,
                          "error": relative_error(W, W_hat, H),
                          **({"sensitivity": run.sensitivity[lay.name]}
                             if lay.name in run.sensitivity else {})}
    with torch.no_grad():
        module.weight.copy_(W_hat)


def prune_blocks(run: Layerwise, counts: dict[str, int] | None, target: float | None = None
                 ) -> list[Curve]:
    """Prune every block in turn on the inputs of the pruned blocks before it; returns,
    with ``target``, the layers' error curves measured on those inputs. No masks are kept
    (they would grow with the model's depth): the pruned weights are plain zeros."""
    by_name = {lay.name: lay for lay in run.cm.layers}
    floors = dict(zip(by_name, run.space.floors(), strict=True))
    curves = []

    def work(i: int, block: nn.Module, grams: Grams) -> bool:
        for name, module in grams.layers.items():
            lay, H = by_name[name + ".weight"], grams.gram(name)
            if target is not None:
                curves.append(_curve(run, lay, module.weight.detach(), H,
                                     floors[lay.name], target))
            _solve_layer(run, module, lay, H, None if counts is None else counts[lay.name])
        return True

    run_blocks(run.blocks, run.stream(), run.layers, work, run.ranks, run.device,
               f"{run.config.method} blocks", run.progress)
    return curves


def _restore(run: Layerwise, model: nn.Module) -> None:
    """The dense weights of every prunable layer back from the user's ``model``."""
    with torch.no_grad():
        for lay in run.cm.layers:
            module_name, _, attr = lay.name.rpartition(".")
            lay.tensor.copy_(getattr(model.get_submodule(module_name), attr).detach())


def run(model: nn.Module, data: object, flops: float | None, nnz: float | None,
        cfg: PruneConfig, given: frozenset, progress: bool) -> PruneResult:
    """Prune a copy of ``model`` layer by layer (see the module's docstring)."""
    t_start = time.perf_counter()
    lw, final = setup(model, data, flops, nnz, cfg, progress)
    cfg = lw.config
    move_outside(lw.work, lw.blocks, lw.device)
    counts, alloc = _counts(lw, final, lambda target: measure_curves(lw, target))
    t = time.perf_counter()
    target = None
    if cfg.passes == 2:
        target = min(sum(counts.values()) / lw.cm.num_weights, 1.0)
    curves = prune_blocks(lw, counts, target)
    passes = [{"error": alloc.error, "lower_bound": alloc.lower_bound}] if alloc else []
    if cfg.passes == 2:
        again = allocate(curves, final.cost, final.count)
        passes.append({"error": again.error, "lower_bound": again.lower_bound,
                       "changed_layers": sum(again.kept[k] != counts[k] for k in counts)})
        if again.kept != counts:
            _restore(lw, model)
            counts, alloc = again.kept, again
            prune_blocks(lw, counts)
    lw.times["prune"] = time.perf_counter() - t
    move_outside(lw.work, lw.blocks, torch.device("cpu"))
    return _finish(lw, final, alloc, passes, flops, nnz, t_start)


def _finish(lw: Layerwise, final, alloc: Allocation | None, passes: list[dict],
            flops: float | None, nnz: float | None, t_start: float) -> PruneResult:
    """Verify the pruned copy through the recount and report. Its zeros are plain weights:
    prune masks would double a large model's memory."""
    cm, cfg = lw.cm, lw.config
    flops_kept, nnz_kept, layers = lw.space.verify(lw.work, final, cfg.task, lw.probe)
    tokens = _tokens(lw.probe)
    details = {
        "loss_model": f"layer-wise: {len(lw.blocks)} blocks at {lw.blocks.path}, "
                      f"{cfg.n_calibration} calibration sequences",
        "allocation": cfg.allocation if cfg.pattern is None else f"pattern {cfg.pattern}",
        "masks": "none: the pruned weights are plain zeros (prune masks would double the "
                 "model's memory)",
        "macs_per_token": cm.dense_macs / tokens, "fixed_macs_per_token": cm.fixed_macs / tokens,
        "tokens_per_sequence": tokens, "layers": [lw.rows[lay.name] for lay in cm.layers]}
    if alloc is not None:
        details.update(allocation_error=alloc.error, allocation_lower_bound=alloc.lower_bound,
                       passes=passes, error_weights=(
                           "each layer's sensitivity: its mean squared output gradient on "
                           f"the first {SENSITIVITY_SEQUENCES} calibration sequences"))
    lw.times["total"] = time.perf_counter() - t_start
    return PruneResult(
        model=lw.work, config=cfg, flops_budget=flops, nnz_budget=nnz,
        flops_fraction=flops_kept, nnz_fraction=nnz_kept, dense_macs=cm.dense_macs,
        num_weights=cm.num_weights, layers=layers,
        ilp_gap=None if alloc is None else alloc.gap,
        ilp_upper_bound=None if alloc is None else -alloc.lower_bound, times=lw.times,
        peak_rss_mb=peak_rss_mb(), excluded=cm.excluded, fixed_macs=cm.fixed_macs,
        details=details)


def _tokens(probe: object) -> int:
    """Tokens per sequence of a probe of token ids (1 for other inputs)."""
    from falcon_prune.data.batches import leaves

    ids = [t for t in leaves(probe) if not t.is_floating_point()]
    return int(ids[0].shape[-1]) if ids and ids[0].dim() > 1 else 1



def choose_loss_model(model: nn.Module, cfg: PruneConfig, given: frozenset = frozenset()
                      ) -> tuple[PruneConfig, str | None]:
    """The run's config with ``loss_model`` decided and the other loss model's settings set
    to None, and why when it was 'auto': the loss model whose settings were ``given``,
    else layer-wise when the model has repeated blocks and the global model's gradient
    matrix would not fit the memory limit even in float16, else global."""
    from falcon_prune.methods.registry import (
        GRADIENT_SETTINGS,
        HELD_OUT_SETTINGS,
        LAYERWISE_SETTINGS,
    )

    layerwise_only = {*LAYERWISE_SETTINGS, "damp"} - {"loss_model"}
    global_only = {*GRADIENT_SETTINGS, *HELD_OUT_SETTINGS, "solver"}
    why, loss = None, cfg.loss_model
    if loss == "auto":  # the memory limit and where X goes are what auto decides by
        mine = layerwise_only & given
        theirs = global_only & given - {"memory_limit", "storage", "scratch_dir", "dtype"}
        if mine and theirs:
            raise ConfigError(f"{', '.join(sorted(mine))} are settings of the layer-wise loss "
                              f"model and {', '.join(sorted(theirs))} of the global one; give "
                              "loss_model='layerwise' or 'global' with the settings of one")
        loss, why = ("layerwise", f"layer-wise: {', '.join(sorted(mine))} given") if mine \
            else ("global", f"global: {', '.join(sorted(theirs))} given") if theirs \
            else _structured_language_model(model, cfg) or _by_memory(model, cfg)
    unused = global_only if loss == "layerwise" else layerwise_only
    if loss == "layerwise":
        if "obs_rank" in given:
            raise ConfigError("obs_rank is the rank of the global loss model's group "
                              "saliency; the layer-wise run chooses units on each "
                              "layer's input Gram at full rank: drop obs_rank")
        unused = {*unused, "obs_rank"}
    return cfg.replace(loss_model=loss, **dict.fromkeys(sorted(unused))), why


def _structured_language_model(model: nn.Module, cfg: PruneConfig
                               ) -> tuple[str, str] | None:
    """'layerwise' for structure='channels' on a language model with repeated blocks:
    its heads and MLP channels are found block by block (a whole-graph tracer does not
    know grouped-query attention); None otherwise."""
    if cfg.structure == "channels" and cfg.task.name == "language_modeling" and \
            _has_blocks(model, cfg.blocks):
        return "layerwise", ("layer-wise: structured pruning of a language model's blocks "
                             "(attention head groups and MLP channels)")
    return None


def _by_memory(model: nn.Module, cfg: PruneConfig) -> tuple[str, str]:
    """'layerwise' when the model has blocks and the global gradient matrix would not fit
    the memory limit even in float16, else 'global'; and why."""
    from falcon_prune.analysis.prunable import prunable_parameters
    from falcon_prune.loss.planning import default_memory_limit, estimate_bytes, format_bytes

    p = sum(getattr(m, a).numel() for _, m, a, _ in prunable_parameters(
        model, cfg.include, cfg.exclude))
    need = estimate_bytes(cfg.n_gradients, p, torch.float16)
    limit = cfg.memory_limit or default_memory_limit()
    fits = f"({cfg.n_gradients} x {p:,} weights: {format_bytes(need)} in float16, limit " \
           f"{format_bytes(limit)})"
    if need > limit and _has_blocks(model, cfg.blocks):
        return "layerwise", f"layer-wise: the global gradient matrix would not fit {fits}"
    return "global", f"global: the gradient matrix fits {fits}" if need <= limit else \
        f"global: no repeated blocks to run layer by layer {fits}"


def _has_blocks(model: nn.Module, path: str | None) -> bool:
    try:
        find_blocks(model, path)
    except (ConfigError, ModelError):
        return False
    return True
