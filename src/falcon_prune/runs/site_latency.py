"""A measured latency budget for the structured layer-wise run (``latency=``).

The budget is a fraction of the dense model's seconds per forward at ``latency_batch``
sequences of ``latency_tokens`` tokens (a language model's token ids cut to that length;
1 times one decoding step's matrix-vector products, the calibration length a prefill),
on the device the model is on. The table of block times
(:class:`~falcon_prune.analysis.site_timing.SiteTimes`) is measured on the dense copy
before anything is pruned and calibrated once on a copy that keeps about half of every
site; the allocation (the knapsack, or one fraction for every site) then counts each
site's predicted seconds as its second budget. After pruning, the pruned model is
measured against the dense copy side by side and both figures are reported
(``details['latency']``); a measured time above the budget gives a warning, as timings on
a busy machine vary.
"""

from __future__ import annotations

import time
import warnings
from typing import TYPE_CHECKING

import torch
from torch import nn

from falcon_prune.analysis.masks import clone_model
from falcon_prune.analysis.site_timing import SiteTimes, first_units, measure_sites, time_grid
from falcon_prune.analysis.sites import shrink
from falcon_prune.analysis.timing import LATENCY_REPEATS, latency_batch, side_by_side
from falcon_prune.data.batches import leaves, map_tensors
from falcon_prune.errors import BudgetError, ConfigError

if TYPE_CHECKING:
    from falcon_prune.analysis.sites import Site
    from falcon_prune.runs.structured import Units


def _is_tokens(t: torch.Tensor) -> bool:
    return not t.is_floating_point() and t.dim() == 2


def latency_inputs(run: Units) -> object:
    """``latency_batch`` copies of the probe sequence with every (batch, tokens) integer
    tensor (token ids, masks, labels) cut to ``latency_tokens`` tokens."""
    cfg = run.config
    x = latency_batch(run.probe, cfg.latency_batch)
    t = cfg.latency_tokens
    return x if t is None else map_tensors(x, lambda v: v[:, :t] if _is_tokens(v) else v)


def resolve(run: Units) -> None:
    """Set the run's ``latency_tokens`` (the calibration length when not given) after
    refusing one the model's inputs cannot be cut to, and a model that is not on the
    run's device (a latency is measured where the model runs)."""
    t = run.config.latency_tokens
    ids = [v for v in leaves(run.probe) if _is_tokens(v)]
    if t is not None and not ids:
        raise ConfigError("latency_tokens cuts a language model's token sequences; this "
                          "model's inputs hold none: drop latency_tokens")
    if t is not None and t > ids[0].shape[1]:
        raise ConfigError(f"latency_tokens={t} is longer than the calibration sequences "
                          f"({ids[0].shape[1]} tokens): give at most that")
    home, dev = next(run.work.parameters()).device, run.device
    if home.type != dev.type or dev.index not in (None, home.index):
        raise ConfigError(f"a latency= budget is measured where the model runs: the model "
                          f"is on {home}, the run's device is {run.device}; move the model "
                          f"there or pass device='{home}'")
    if t is None and ids:
        run.config = run.config.replace(latency_tokens=int(ids[0].shape[1]))


def measure_fraction(run: Units, dense: nn.Module, small: nn.Module) -> dict:
    """The time of ``small`` as a fraction of ``dense``'s at the latency inputs, measured
    side by side (:func:`~falcon_prune.analysis.timing.side_by_side`)."""
    return side_by_side(run.config.task.call, latency_inputs(run), dense, small, run.device)


def _half(run: Units) -> dict:
    """{(block, site's consumer): about half of the site's units (whole steps, at least its least)}
    for every site that may shrink."""
    out = {}
    for i in range(len(run.blocks)):
        for s in run.sites:
            least, step = run.least(i, s), run.step(s)
            if least < s.units:
                out[(i, s.consumer)] = min(s.units, max(least,
                                                        step * round(s.units / 2 / step)))
    return out


def site_times(run: Units, dense: nn.Module) -> tuple[SiteTimes, dict]:
    """The table of block times of the ``dense`` copy at the latency inputs, calibrated on
    a copy that keeps about half of every site; and the calibration's record."""
    t0 = time.perf_counter()
    resolve(run)
    call, x = run.config.task.call, latency_inputs(run)
    names = {s.consumer: s for s in run.sites}
    grids = {k: time_grid(s.units, min(s.units, run.step(s)), run.step(s))
             for k, s in names.items()}
    times = measure_sites(dense, run.blocks.path, run.sites, grids, lambda m: call(m, x),
                          LATENCY_REPEATS, run.device, run.progress)
    half = _half(run)
    small = clone_model(dense)
    for (i, name), k in half.items():
        s = names[name]
        shrink(small.get_submodule(f"{run.blocks.path}.{i}"), s, first_units(s.units, k))
    measured = measure_fraction(run, dense, small)["measured_fraction"]
    del small
    table = times.seconds(half) / times.total
    times.calibrate(half, measured)
    run.times["latency_table"] = time.perf_counter() - t0
    return times, {"table_fraction": table, "measured_fraction": measured,
                   "scale": times.scale}


def sizes(run: Units, times: SiteTimes, i: int, site: Site, counts: list[int]
          ) -> list[float]:
    """The seconds of block i's time that ``site`` accounts for at each of ``counts``
    units, the allocation's second budget: scale x inside[i] x r_s(k)."""
    return [times.scale * times.inside[i] * times.ratio(site.consumer, k) for k in counts]


def budget(run: Units, times: SiteTimes, latency: float) -> float:
    """The second budget of the allocation (seconds, as :func:`sizes` counts them) for a
    predicted time of ``latency`` x the dense model's; BudgetError when the fewest units
    every site may keep are already predicted slower."""
    n = len(run.blocks)
    full = sum(sizes(run, times, i, s, [s.units])[0] for i in range(n) for s in run.sites)
    least = {(i, s.consumer): run.least(i, s) for i in range(n) for s in run.sites}
    floor = times.seconds(least) / times.total
    if floor > latency:
        raise BudgetError(
            f"keeping one unit of every site is predicted at {floor:.1%} of the dense "
            f"model's time at {run.config.latency_batch} x {run.config.latency_tokens} "
            f"tokens; a latency budget of {latency:.1%} cannot be met by removing heads "
            "and channels: raise latency=")
    return full - (1.0 - latency) * times.total


def report(run: Units, dense: nn.Module, times: SiteTimes, latency: float,
           calibration: dict) -> dict:
    """Measure the pruned model against the ``dense`` copy; ``details['latency']`` with
    the prediction, the measurement and the calibration; a warning when the measured
    time is above the budget."""
    t0 = time.perf_counter()
    kept = {(i, s.consumer): run.counts[run.name(i, s)] for i in range(len(run.blocks))
            for s in run.sites}
    m = measure_fraction(run, dense, run.work)
    run.times["latency_check"] = time.perf_counter() - t0
    out = {"budget": latency, "batch": run.config.latency_batch,
           "tokens": run.config.latency_tokens, "device": str(run.device),
           "predicted_fraction": times.seconds(kept) / times.total, **m,
           "calibration": calibration,
           "counts_timed": dict(times.timed)}
    if m["measured_fraction"] > latency:
        warnings.warn(
            f"the pruned model ran in {m['measured_fraction']:.2f} of the dense one's time "
            f"at {out['batch']} x {out['tokens']} tokens on {run.device} (measured side by "
            f"side), above the latency budget {latency:.2f} (predicted "
            f"{out['predicted_fraction']:.2f}); timings on a busy machine vary: see "
            "docs/api.md, 'Latency budgets'", UserWarning, stacklevel=4)
    return out
