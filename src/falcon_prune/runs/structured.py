"""Structured layer-wise pruning: fewer attention head groups and MLP channels per block.

The pipeline behind ``prune(..., structure='channels')`` with the layer-wise loss model:

1. Set up: a copy of the model, its repeated blocks, the calibration sequences, and the
   *sites* of the blocks (attention head groups, MLP channels: found by probing the first
   block, :mod:`falcon_prune.analysis.sites`), each unit with its MACs per token and its
   parameters. The FLOP budget is a fraction of the MACs per token at the calibration
   sequences' length: of the whole model's with ``flops_of='model'``, else of the sites'
   (what can shrink); the ``nnz`` budget a fraction of the sites' parameters, or in its
   place a ``latency`` budget of measured seconds (:mod:`falcon_prune.runs.site_latency`).
   ``round_to`` makes counts move in steps, ``keep_layers`` keeps sites whole.
2. Allocate: with ``allocation='ilp'``, every consumer layer's sensitivity, then each
   site's error curve on the dense model (the group OBS sweep of
   :mod:`falcon_prune.methods.group_obs` on the Gram of its consumer's inputs, weighted by
   the sensitivity); the knapsack chooses each site's kept units under both budgets, with
   its certificate. 'uniform' keeps the same fraction of every site's units.
3. Prune block by block (the sequential protocol): each site's units are chosen on the
   Gram of its consumer's inputs from the pruned blocks before it (group OBS, or the
   method's score), removed, and the consumer refit by least squares on the kept units.
4. Verify: the pruned model's MACs per token (PyTorch's FLOP counter) and parameters are
   recounted and checked against the budgets.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from falcon_prune.analysis.blocks import find_blocks, move_outside
from falcon_prune.analysis.costs import plain_kernels
from falcon_prune.analysis.masks import clone_model, make_permanent
from falcon_prune.analysis.site_timing import SiteTimes
from falcon_prune.analysis.sites import Site, consumer_weight, find_sites, shrink
from falcon_prune.analysis.structure import kept_layers
from falcon_prune.config import PruneConfig
from falcon_prune.data.batches import collect
from falcon_prune.errors import BudgetError, BudgetViolation, ConfigError, ModelError
from falcon_prune.loss.distributed import Ranks, require_same_model
from falcon_prune.loss.layerwise import Grams
from falcon_prune.methods.group_obs import refit, remove_units
from falcon_prune.methods.reconstruction import relative_error
from falcon_prune.results import LayerReport, PruneResult, peak_rss_mb
from falcon_prune.runs import site_latency
from falcon_prune.runs.layerwise import CURVE_SEQUENCES, BlockRun
from falcon_prune.runs.sequential import capture, run_blocks
from falcon_prune.runs.setup import check_model, check_task
from falcon_prune.selection.allocation import Allocation, Curve, allocate, uniform

#: methods that choose units by a score of the consumer's columns, without a refit
SCORED = {"wanda": "wanda: |W| by the input norm per unit, no refit"}


@dataclass(kw_only=True)
class Units(BlockRun):
    """A structured layer-wise run: the sites, and the MACs per token of the model and
    of what no site can remove."""

    sites: list[Site]
    dropped: dict[str, str]
    tokens: int
    model_macs: float
    fixed_macs: float
    counts: dict[str, int] = field(default_factory=dict)
    #: consumer names (block i's) of the sites keep_layers keeps whole
    whole: frozenset[str] = frozenset()
    #: the measured block times of a latency budget (the allocation's second budget)
    site_times: SiteTimes | None = None

    def layers(self, i: int, block: nn.Module) -> dict[str, nn.Module]:
        return {self.name(i, s): block.get_submodule(s.consumer) for s in self.sites}

    def name(self, i: int, site: Site) -> str:
        return f"{self.blocks.path}.{i}.{site.consumer}"

    def step(self, site: Site) -> int:
        """Units a count of ``site`` moves by: the fewest whose columns of the consumer's
        input are a multiple of ``round_to`` (1 without it)."""
        r = self.config.round_to or 1
        return r // math.gcd(r, int(site.columns.shape[1]))

    def least(self, i: int, site: Site) -> int:
        """The fewest units site ``site`` of block i may keep: all of them when
        keep_layers names one of its layers, else one step."""
        return site.units if self.name(i, site) in self.whole else \
            min(site.units, self.step(site))

    def curve(self, i: int, site: Site, kept: list[int], errors: list[float]) -> Curve:
        """The allocation's curve of site ``site`` of block i: of the counts ``kept``
        (ascending) and their ``errors``, those the site may keep (:meth:`least`, whole
        steps, or all units), as parameters at MACs per token per parameter; with a
        latency budget, each count's predicted seconds as the second budget."""
        p, k0, step = site.params, self.least(i, site), self.step(site)
        pts = [(k, e) for k, e in zip(kept, errors, strict=True)
               if k == site.units or (k >= k0 and k % step == 0)]
        counts = [k for k, _ in pts]
        seconds = None if self.site_times is None else \
            site_latency.sizes(self, self.site_times, i, site, counts)
        return Curve(self.name(i, site), site.units * p, site.macs / p,
                     [k * p for k in counts], [e for _, e in pts], step=p * step,
                     sizes=seconds)


def model_macs(model: nn.Module, inputs: object, call) -> float:
    """MACs of one run of ``model`` on ``inputs`` (PyTorch's FLOP counter, attention
    through the math backend)."""
    with torch.no_grad(), plain_kernels(model), FlopCounterMode(display=False) as counter:
        call(model, inputs)
    return counter.get_total_flops() / 2


def setup(model: nn.Module, data: object, cfg: PruneConfig, progress: bool) -> Units:
    """Check and copy the model, find its blocks and their sites, draw the calibration
    sequences and count the MACs per token."""
    check_model(model)
    if cfg.include is not None:
        raise ConfigError("structured layer-wise pruning removes units of the blocks' "
                          "sites; include= cannot add layers (use loss_model='global')")
    device = torch.device(cfg.device)
    work = make_permanent(clone_model(model)).eval()
    blocks = find_blocks(work, cfg.blocks)
    ranks = Ranks.current()
    require_same_model(ranks, work)
    drawn = collect(data, cfg.n_calibration, cfg.seed, cfg.sampling).samples
    check_task(work, drawn, cfg.task, torch.device("cpu"), count=1)
    probe = cfg.task.inputs(drawn.take(slice(0, 1)).batch)
    home = next(work.parameters()).device  # where the model is (the sites are found there)
    st = capture(work, blocks, [probe], cfg.task.call, home)
    tokens = int(st.states[0].shape[:-1].numel())

    def run_block(block: nn.Module) -> object:
        return block(st.states[0], *st.args[0], **st.kwargs[0])

    sites, dropped = find_sites(list(blocks.modules), run_block, tokens, cfg.seed or 0,
                                cfg.attention_units or "groups")
    if not sites:
        raise ModelError(
            f"no attention heads or MLP channels of the blocks at {blocks.path} can be "
            f"removed ({'; '.join(f'{k}: {v}' for k, v in dropped.items()) or 'none found'})"
            "; use structure='weights'")
    total = model_macs(work, probe, cfg.task.call) / tokens
    prunable = len(blocks) * sum(s.units * s.macs for s in sites)
    first, last = ranks.bounds(len(drawn))
    return Units(work=work, blocks=blocks, config=cfg.replace(sampling=cfg.sampling or
                                                              "random"),
                 samples=drawn.take(slice(first, last)), first=first, device=device,
                 ranks=ranks, progress=progress and ranks.is_main, probe=probe,
                 sites=sites, dropped=dropped, tokens=tokens, model_macs=total,
                 fixed_macs=total - prunable,
                 whole=kept_whole(work, blocks.path, len(blocks), sites,
                                  cfg.keep_layers or ()))


def kept_whole(model: nn.Module, path: str, n: int, sites: list[Site],
               keep_layers: tuple[str, ...]) -> frozenset[str]:
    """The consumer names (``path.i.consumer``) of the sites of the ``n`` blocks at
    ``path`` that keep every unit: those with a layer (a producer or the consumer) whose
    name matches one of ``keep_layers`` (module names or globs). ModelError for a name
    that matches no module of ``model``."""
    kept = set(kept_layers(model, keep_layers))
    return frozenset(f"{path}.{i}.{s.consumer}" for i in range(n) for s in sites
                     if any(f"{path}.{i}.{layer}" in kept
                            for layer in (*s.producers, s.consumer)))


def budgets(run: Units, flops: float | None, nnz: float | None,
            latency: float | None = None) -> tuple[float, float]:
    """(MACs per token, parameters) the sites may keep; BudgetError when the fewest units
    every site may keep (:meth:`Units.least`) are already over them."""
    if flops is None and nnz is None and latency is None:
        raise BudgetError("give at least one budget: flops=<fraction kept>, "
                          "nnz=<fraction of the parameters> or latency=<fraction of the "
                          "time>")
    n = len(run.blocks)
    macs = n * sum(s.units * s.macs for s in run.sites)
    params = n * sum(s.units * s.params for s in run.sites)
    whole = run.config.flops_of == "model"
    F = math.inf if flops is None else (flops * run.model_macs - run.fixed_macs if whole
                                        else flops * macs)
    S = math.inf if nnz is None else nnz * params
    least = [(run.least(i, s), s) for i in range(n) for s in run.sites]
    least_macs = sum(k * s.macs for k, s in least)
    least_params = sum(k * s.params for k, s in least)
    if F < least_macs or S < least_params:
        scale = run.model_macs if whole else macs
        raise BudgetError(
            f"keeping one unit of every site (more where round_to or keep_layers ask) "
            f"already takes "
            f"{(least_macs + (run.fixed_macs if whole else 0)) / scale:.1%} of the MACs per "
            f"token and {least_params / params:.1%} of the parameters; raise the budgets")
    return F, S


def _sweep(run: Units, site: Site, W: torch.Tensor, H: torch.Tensor, least: int):
    """The order in which the site's units go (the group OBS sweep, or the method's
    score) and the errors after each step: (removed units in order, [(removed, error)])."""
    if run.config.method not in SCORED:
        sw = remove_units(W, H, site.columns, least, run.config.damp or 0.01)
        return sw.order, list(zip(sw.after, sw.errors, strict=True))
    cols = W.double()[:, site.columns.to(W.device)]  # (r, U, c)
    # Wanda: |W| by the input's norm, summed over the unit's columns
    x = H.diagonal().double().clamp_min(0)[site.columns.to(H.device)]
    score = (cols.pow(2) * x[None]).sum((0, 2))
    order = score.argsort()[:site.units - least]
    return order.cpu(), [(0, 0.0), (len(order), float(score[order].sum()))]


def weighted(run: Units, name: str, W: torch.Tensor) -> torch.Tensor:
    """The consumer's weight (r, d) with row j scaled by the square root of its output
    feature's sensitivity s_j (when measured): the group OBS error of the scaled weight is
    Σ_j s_j x (row j's reconstruction error), the loss change under a diagonal Fisher on
    the consumer's outputs, and each row's least-squares refit is the same either way."""
    s = run.sensitivity.get(name + ".weight")
    return W if s is None else W * s.sqrt().to(W.device, W.dtype)[:, None]


def measure_curves(run: Units) -> list[Curve]:
    """Every site's error curve on the dense model (weighted by its consumer's
    sensitivity), from the first CURVE_SEQUENCES calibration sequences."""
    curves: list[Curve] = []

    def work(i: int, block: nn.Module, grams: Grams) -> bool:
        for site in run.sites:
            name = run.name(i, site)
            W, H = weighted(run, name, consumer_weight(block, site).detach()), grams.gram(name)
            # down to the fewest units the site may keep, so that the curve ends there
            _, path = _sweep(run, site, W, H, run.least(i, site))
            points = {site.units - r: e for r, e in reversed(path)}  # count: error
            curves.append(run.curve(i, site, list(points), list(points.values())))
        return False

    run_blocks(run.blocks, run.stream(CURVE_SEQUENCES), run.layers, work, run.ranks,
               run.device, "error curves", run.progress)
    return curves


def allocation(run: Units, F: float, S: float) -> tuple[dict[str, int], Allocation | None]:
    """Each site's kept units (by consumer name), and the knapsack's answer for 'ilp'."""
    cfg = run.config
    if cfg.allocation not in ("ilp", "uniform"):
        raise ConfigError(f"structured layer-wise pruning allocates with 'ilp' or "
                          f"'uniform', not {cfg.allocation!r}")
    Fc = None if F == math.inf else F
    Sc = None if S == math.inf else S
    if cfg.allocation == "uniform":
        curves = [_counts_only(run, i, s) for i in range(len(run.blocks)) for s in run.sites]
        kept, alloc = uniform(curves, Fc, Sc), None
    else:
        run.measure_sensitivity(per_output=True)
        t = time.perf_counter()
        curves = measure_curves(run)
        run.times["curves"] = time.perf_counter() - t
        alloc = allocate(curves, Fc, Sc)
        kept = alloc.kept
    per = {run.name(i, s): s.params for i in range(len(run.blocks)) for s in run.sites}
    return {name: k // per[name] for name, k in kept.items()}, alloc


def _counts_only(run: Units, i: int, site: Site) -> Curve:
    """The curve one fraction for every site needs (counts, not errors): the least and
    all units (a latency budget's seconds are linear in the units between them)."""
    k0 = run.least(i, site)
    ks = [site.units] if k0 == site.units else [k0, site.units]
    return run.curve(i, site, ks, [1.0 - k / site.units for k in ks])


def _prune_site(run: Units, i: int, block: nn.Module, site: Site, H: torch.Tensor) -> None:
    """Remove the units of one site that the allocation drops, and refit its consumer
    on the kept ones (OBS methods); record the site's report row."""
    name, k = run.name(i, site), run.counts[run.name(i, site)]
    W = consumer_weight(block, site).detach()
    order, _ = _sweep(run, site, weighted(run, name, W), H, k)
    keep = torch.ones(site.units, dtype=torch.bool)
    keep[order[:site.units - k]] = False
    keep = run.ranks.broadcast(keep.to(W.device)).cpu()
    cols = site.columns[keep].reshape(-1).sort().values
    refitted = SCORED.get(run.config.method) is None
    new = refit(W, H, cols.to(W.device), run.config.damp or 0.01) if refitted \
        else W.double()[:, cols.to(W.device)]
    new = run.ranks.broadcast(new.to(W.dtype).contiguous())
    W_hat = torch.zeros_like(W)
    W_hat[:, cols.to(W.device)] = new
    run.rows[name] = {"layer": name, "kind": site.kind, "units": site.units, "kept": k,
                      "error": relative_error(W, W_hat, H)}
    shrink(block, site, keep)
    with torch.no_grad():
        consumer_weight(block, site).copy_(new)


def prune_blocks(run: Units) -> None:
    """Prune every block in turn on the inputs of the pruned blocks before it."""
    def work(i: int, block: nn.Module, grams: Grams) -> bool:
        for site in run.sites:
            _prune_site(run, i, block, site, grams.gram(run.name(i, site)))
        return True

    run_blocks(run.blocks, run.stream(), run.layers, work, run.ranks, run.device,
               f"{run.config.method} blocks", run.progress)


def run(model: nn.Module, data: object, flops: float | None, nnz: float | None,
        cfg: PruneConfig, given: frozenset, progress: bool,
        latency: float | None = None) -> PruneResult:
    """Prune a copy of ``model`` structurally, block by block (see the module's
    docstring); a ``latency`` budget takes the place of ``nnz``
    (:mod:`falcon_prune.runs.site_latency`)."""
    t_start = time.perf_counter()
    if cfg.passes not in (None, 1):
        raise ConfigError("structured layer-wise pruning allocates once (passes=1)")
    units = setup(model, data, cfg, progress)
    F, S = budgets(units, flops, nnz, latency)
    second, dense = S, None
    if latency is not None:  # the second budget: predicted seconds
        dense = clone_model(units.work)
        units.site_times, calibration = site_latency.site_times(units, dense)
        second = site_latency.budget(units, units.site_times, latency)
    move_outside(units.work, units.blocks, units.device)
    units.counts, alloc = allocation(units, F, second)
    t = time.perf_counter()
    prune_blocks(units)
    units.times["prune"] = time.perf_counter() - t
    measured = {} if dense is None else {"latency": site_latency.report(
        units, dense, units.site_times, latency, calibration)}
    move_outside(units.work, units.blocks, torch.device("cpu"))
    return _finish(units, F, S, alloc, flops, nnz, t_start, measured)


def _recount(run: Units) -> tuple[float, int]:
    """(MACs per token the sites keep, parameters they keep), recounted on the pruned
    model: its MACs by PyTorch's FLOP counter less the fixed ones, its parameters less
    those outside the sites."""
    macs = model_macs(run.work, run.probe, run.config.task.call) / run.tokens - run.fixed_macs
    params = 0
    for block in run.blocks.modules:
        for site in run.sites:
            params += sum(block.get_submodule(n).weight.numel() for n in site.producers)
            params += sum(block.get_submodule(n).bias.numel() for n in site.producers
                          if block.get_submodule(n).bias is not None)
            params += consumer_weight(block, site).numel()
    return macs, params


def _finish(run: Units, F: float, S: float, alloc: Allocation | None,
            flops: float | None, nnz: float | None, t_start: float,
            measured: dict) -> PruneResult:
    """Check the pruned copy against the budgets through the recount, and report
    (``measured``: the latency's record, added to the details)."""
    n = len(run.blocks)
    dense_macs = n * sum(s.units * s.macs for s in run.sites)
    dense_params = n * sum(s.units * s.params for s in run.sites)
    macs, params = _recount(run)
    if macs > F * (1 + 1e-6) + 1e-6 or params > S:
        raise BudgetViolation(
            f"the pruned model keeps {macs:,.0f} MACs per token and {params:,} parameters "
            f"of the sites, over the budgets ({F:,.0f}, {S:,.0f}); please report this")
    whole = run.config.flops_of == "model"
    flops_kept = (macs + run.fixed_macs) / run.model_macs if whole else macs / dense_macs
    layers = [LayerReport(row["layer"], row["kind"], row["units"] * s.params,
                          row["kept"] * s.params, row["units"] * s.macs * run.tokens,
                          row["kept"] * s.macs * run.tokens)
              for row in run.rows.values() for s in run.sites
              if row["layer"].endswith("." + s.consumer)]
    details = {
        "loss_model": f"layer-wise, structured: {n} blocks at {run.blocks.path}, "
                      f"{run.config.n_calibration} calibration sequences",
        "sites": [s.label() for s in run.sites], "left_whole": run.dropped,
        "allocation": run.config.allocation, "unit_choice": SCORED.get(
            run.config.method, "group OBS with a least-squares refit of the consumer"),
        "macs_per_token": run.model_macs, "fixed_macs_per_token": run.fixed_macs,
        "kept_macs_per_token": macs + run.fixed_macs, "tokens_per_sequence": run.tokens,
        "layers": list(run.rows.values()), **measured}
    if alloc is not None:
        details.update(allocation_error=alloc.error, allocation_lower_bound=alloc.lower_bound)
    run.times["total"] = time.perf_counter() - t_start
    return PruneResult(
        model=run.work, config=run.config, flops_budget=flops, nnz_budget=nnz,
        flops_fraction=flops_kept, nnz_fraction=params / dense_params,
        dense_macs=(run.model_macs if whole else dense_macs) * run.tokens,
        num_weights=dense_params, layers=layers,
        ilp_gap=None if alloc is None else alloc.gap,
        ilp_upper_bound=None if alloc is None else -alloc.lower_bound, times=run.times,
        peak_rss_mb=peak_rss_mb(), details=details)
