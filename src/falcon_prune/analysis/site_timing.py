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
  the first block with site s cut to k units (the others whole) timed against the whole
  block, interleaved, on the input the block receives: the ratio r_s(k), made at most 1
  and non-decreasing in k (a count never predicted slower than a larger one). The blocks of a
  language model have one shape, so the first block serves for all.

A choice is predicted to take

    T = total - scale x Σ_i Σ_s inside[i] x (1 - r_s(k_{i,s}))  seconds,

the dense time less what each site's count saves of its block's time, r_s interpolated
linearly between the grid's counts. ``scale`` is set once (:meth:`SiteTimes.calibrate`)
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


def first_units(units: int, k: int) -> torch.Tensor:
    """(units,) bool: the first ``k`` of ``units`` kept (what a timing keeps)."""
    keep = torch.zeros(units, dtype=torch.bool)
    keep[:k] = True
    return keep


@dataclass
class SiteTimes:
    """The measured times of one model at one latency shape: ``total`` (seconds per
    forward of the dense model), ``inside`` (seconds per forward in each block), and per
    site (by consumer name) the grid of ``counts`` with the block-time ``ratios`` r_s(k);
    ``scale`` the calibration of the predicted savings."""

    total: float
    inside: list[float]
    counts: dict[str, list[int]] = field(default_factory=dict)
    ratios: dict[str, list[float]] = field(default_factory=dict)
    scale: float = 1.0

    def ratio(self, site: str, k: int) -> float:
        """r_s(k): the first block's time with ``site`` (its consumer's name) at ``k``
        units over its whole time, interpolated linearly between the timed counts."""
        ks, rs = self.counts[site], self.ratios[site]
        k = min(max(k, ks[0]), ks[-1])
        j = next(j for j in range(len(ks)) if ks[j] >= k)
        if ks[j] == k or j == 0:
            return rs[j]
        w = (k - ks[j - 1]) / (ks[j] - ks[j - 1])
        return rs[j - 1] + w * (rs[j] - rs[j - 1])

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


def measure_sites(model: nn.Module, blocks: list[nn.Module], sites: list[Site],
                  least: dict[str, int], step: dict[str, int], run_model: Callable[[], object],
                  run_block: Callable[[nn.Module], object], repeats: int,
                  device: torch.device, progress: bool = False) -> SiteTimes:
    """The :class:`SiteTimes` of ``model`` (run by ``run_model()``) whose ``blocks`` have
    ``sites``: each site is timed at :func:`time_grid` counts (its ``least`` and ``step``
    units, by consumer name) in a copy of the first block run by ``run_block(block)`` on
    its captured input."""
    total, inside = inside_seconds(model, lambda m, x: run_model(), None,
                                   {str(i): b for i, b in enumerate(blocks)}, repeats, device)
    times = SiteTimes(total, [inside[str(i)] for i in range(len(blocks))])
    first = blocks[0]
    grids = {s.consumer: time_grid(s.units, least[s.consumer], step[s.consumer])
             for s in sites}
    bar = tqdm(total=sum(len(g) - 1 for g in grids.values()), desc="block times",
               unit="count", disable=not progress)
    for site in sites:
        ks = grids[site.consumer]
        ratios = []
        for k in ks:
            if k == site.units:
                ratios.append(1.0)
                continue
            thin = copy.deepcopy(first)
            shrink(thin, site, first_units(site.units, k))
            secs = interleaved_seconds({"thin": lambda b=thin: run_block(b),
                                        "whole": lambda: run_block(first)}, repeats, device)
            ratios.append(secs["thin"] / max(secs["whole"], 1e-12))
            bar.update()
        times.counts[site.consumer] = ks
        # no count predicted slower than a larger one (nor than the whole block)
        r = torch.tensor(ratios, dtype=torch.float64).clamp_max(1.0).flip(0)
        times.ratios[site.consumer] = r.cummin(0).values.flip(0).tolist()
    bar.close()
    return times
