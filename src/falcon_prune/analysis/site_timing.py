"""Measured block times: the latency of a structured layer-wise choice (``latency=``).

The structured layer-wise run keeps k_{i,s} units of site s (attention head groups, MLP
channels) in block i. A FLOP count says little about how long that takes: on a CPU a
one-token forward reads every weight once and pays a fixed cost per operation, a
512-token one is bound by the matrix products; a kernel's speed moves in steps with the
widths. So the time is measured, on the device the model runs on, at the latency shape
(``latency_batch`` sequences of ``latency_tokens`` tokens):

- ``total``: the dense model's seconds per forward, and ``inside[i]``, the seconds spent
  in block i (hooks, interleaved with plain runs; :func:`~falcon_prune.analysis.timing.
  inside_seconds`);
- for every site s and a grid of counts k (at most ``TIME_GRID`` + 2 of them): a copy of
  the model with site s cut to k units in every block (the other sites whole) timed
  against the model, interleaved; what it saves, spread over the blocks by their time,
  gives r_s(k), the ratio of a block's time with the site at k units to its whole time,
  fitted by a line through 1 at all units (:func:`line_fit`: the timings' noise is
  averaged out, not exploited).
  Timed in the model rather than block by block: at one token a block's weights stream
  from memory, while a block timed alone again and again runs from the cache (on SmolLM2
  a table of blocks timed alone chose a model that was slower at one token, and less
  accurate, than a plain parameter budget at the same FLOPs).

A choice is predicted to take

    T = total - scale x Σ_i Σ_s inside[i] x (1 - r_s(k_{i,s}))  seconds,

the dense time less what each site's count saves of its block's time, with
r_s(k) = 1 - b_s (1 - k / U_s) the fitted line. ``scale`` is set once (:meth:`SiteTimes.calibrate`)
from a copy of the model that keeps about half of every site's units, measured against
the dense model side by side: the sum of per-site savings misses what sites share (the
block's fixed cost) and how blocks run together.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from falcon_prune.analysis.sites import Site, shrink
from falcon_prune.analysis.timing import inside_seconds, interleaved_seconds

#: counts at which each site's block time is measured, besides its least and all units
TIME_GRID = 16


def time_grid(units: int, least: int, step: int) -> list[int]:
    """The counts a site of ``units`` units is timed at: ``least``, all, and up to
    ``TIME_GRID`` evenly spaced multiples of ``step`` between them (ascending)."""
    inner = {step * round(units * j / TIME_GRID / step) for j in range(1, TIME_GRID)}
    return sorted({least, units} | {k for k in inner if least < k < units})


def line_fit(counts: list[int], ratios: list[float]) -> float:
    """The slope b >= 0 of the least-squares line through (all units, 1) of the measured
    ratios at ``counts`` (the last all units, ratio 1): r(k) = 1 - b (1 - k / U). A line,
    not the measured steps: the timings' noise is a few per cent, and a table with steps
    let the knapsack pick the counts whose noise happened to be low (on SmolLM2 at one
    token it predicted 0.75 of the dense time for a model measured at 0.79)."""
    U = counts[-1]
    x = torch.tensor([1.0 - k / U for k in counts], dtype=torch.float64)
    y = 1.0 - torch.tensor(ratios, dtype=torch.float64)
    return max(0.0, float((x * y).sum() / (x * x).sum().clamp_min(1e-12)))


def first_units(units: int, k: int) -> torch.Tensor:
    """(units,) bool: the first ``k`` of ``units`` kept (what a timing keeps)."""
    keep = torch.zeros(units, dtype=torch.bool)
    keep[:k] = True
    return keep


@dataclass
class SiteTimes:
    """The measured times of one model at one latency shape: ``total`` (seconds per
    forward of the dense model), ``inside`` (seconds per forward in each block), and per
    site (by consumer name) its ``units`` U_s, the ``slopes`` b_s of its fitted block-time
    ratio and how many counts were ``timed``; ``scale`` the calibration of the predicted
    savings."""

    total: float
    inside: list[float]
    units: dict[str, int] = field(default_factory=dict)
    slopes: dict[str, float] = field(default_factory=dict)
    timed: dict[str, int] = field(default_factory=dict)
    scale: float = 1.0

    def ratio(self, site: str, k: int) -> float:
        """r_s(k) = 1 - b_s (1 - k / U_s): a block's time with ``site`` (its consumer's
        name) at ``k`` units over its whole time."""
        return 1.0 - self.slopes[site] * (1.0 - k / self.units[site])

    def saving(self, i: int, site: str, k: int) -> float:
        """Seconds per forward that keeping ``k`` units of ``site`` (its consumer's name)
        in block i saves (calibrated)."""
        return self.scale * self.inside[i] * (1.0 - self.ratio(site, k))

    def seconds(self, kept: dict[tuple[int, str], int]) -> float:
        """Predicted seconds per forward when block i keeps ``kept[(i, site)]`` units of
        each site (by its consumer's name; sites not named keep all)."""
        return self.total - sum(self.saving(i, s, k) for (i, s), k in kept.items())

    def calibrate(self, kept: dict[tuple[int, str], int], measured: float) -> None:
        """Set ``scale`` so that the choice ``kept`` is predicted at ``measured`` (its time
        as a fraction of the dense model's, measured side by side), within [0.5, 2]; a
        choice that saves under 5 % by the table leaves it at 1."""
        self.scale = 1.0
        saved = 1.0 - self.seconds(kept) / self.total
        if saved > 0.05:
            self.scale = min(2.0, max(0.5, (1.0 - measured) / saved))


def measure_sites(model: nn.Module, path: str, sites: list[Site], grids: dict[str, list[int]],
                  run: Callable[[nn.Module], object], repeats: int, device: torch.device,
                  progress: bool = False) -> SiteTimes:
    """The :class:`SiteTimes` of ``model`` (run on the latency inputs by ``run(model)``),
    whose blocks are the ``nn.ModuleList`` at ``path``: each site at the counts
    ``grids[consumer]`` (ascending, the last all its units), timed in a copy of the whole
    model with that site cut in every block against the model itself, interleaved. In
    the model, not block by block: at one token a block's weights stream from memory,
    while a block timed alone again and again runs from the cache."""
    blocks = list(model.get_submodule(path))
    total, inside = inside_seconds(model, lambda m, x: run(m), None,
                                   {str(i): b for i, b in enumerate(blocks)}, repeats, device)
    times = SiteTimes(total, [inside[str(i)] for i in range(len(blocks))])
    share = total / max(sum(times.inside), 1e-12)  # model seconds per second of blocks
    bar = tqdm(total=sum(len(g) - 1 for g in grids.values()), desc="block times",
               unit="count", disable=not progress)
    for site in sites:
        ks, ratios = grids[site.consumer], []
        for k in ks[:-1]:
            thin = copy.deepcopy(model)
            for block in thin.get_submodule(path):
                shrink(block, site, first_units(site.units, k))
            secs = interleaved_seconds({"thin": lambda m=thin: run(m),
                                        "whole": lambda: run(model)}, repeats, device)
            del thin
            # the blocks' ratio that saves what the model saved: 1 - r = share (1 - r_model)
            ratios.append(1.0 - share * (1.0 - secs["thin"] / max(secs["whole"], 1e-12)))
            bar.update()
        times.units[site.consumer], times.timed[site.consumer] = site.units, len(ks)
        times.slopes[site.consumer] = line_fit(ks, [*ratios, 1.0])
    bar.close()
    return times
