"""What a run returns (:class:`PruneResult`, :class:`GradualResult`), and how it is
written out."""

from __future__ import annotations

import csv
import json
import resource
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from falcon_prune.analysis.prunable import ExcludedLayer
from falcon_prune.errors import ConfigError

if TYPE_CHECKING:
    from falcon_prune.config import GradualConfig, PruneConfig


@dataclass
class LayerReport:
    """One prunable layer after pruning; MACs are per input sample."""

    name: str
    kind: str
    weights: int
    kept: int
    macs_dense: float
    macs_kept: float


@dataclass
class PruneResult:
    """What ``prune`` returns.

    ``model`` is the pruned copy (masks through ``torch.nn.utils.prune``); ``config`` every
    setting actually used; ``flops_fraction`` and ``nnz_fraction`` the kept fractions of
    the prunable weights, recounted from the returned weights; ``excluded`` the weights of
    prunable type left dense and outside the budgets (with the reason); ``times`` seconds
    per phase; ``peak_rss_mb`` the process's peak resident memory at the end (MiB);
    ``details`` solver information (chosen ridge and warm start, candidates, storage);
    ``stages`` the falcon++ trajectory."""

    model: nn.Module
    config: PruneConfig
    flops_budget: float | None
    nnz_budget: float | None
    flops_fraction: float
    nnz_fraction: float
    dense_macs: float
    num_weights: int
    layers: list[LayerReport]
    ilp_gap: float | None
    ilp_upper_bound: float | None
    times: dict[str, float]
    peak_rss_mb: float
    excluded: list[ExcludedLayer] = field(default_factory=list)
    fixed_macs: float = 0.0
    details: dict = field(default_factory=dict)
    stages: list[dict] = field(default_factory=list)

    @property
    def method(self) -> str:
        return self.config.method

    def table(self) -> str:
        """The per-layer report as fixed-width text (excluded layers last); after a
        layer-wise run, with each layer's relative reconstruction error."""
        errors = {row["layer"]: row["error"] for row in self.details.get("layers", [])
                  if isinstance(row, dict) and "error" in row}
        head = f"{'layer':<28} {'kind':<10} {'weights':>9} {'kept':>9} {'MACs dense':>12} "
        head += f"{'MACs kept':>12} {'kept %':>7}" + (f" {'error':>9}" if errors else "")
        rows = [head, "-" * len(head)]
        for r in self.layers:
            pct = 100 * r.kept / r.weights if r.weights else 0.0
            rows.append(f"{r.name[:28]:<28} {r.kind[:10]:<10} {r.weights:>9,} {r.kept:>9,} "
                        f"{r.macs_dense:>12,.0f} {r.macs_kept:>12,.0f} {pct:>6.1f}%"
                        + (f" {errors[r.name]:>9.3g}" if r.name in errors else ""))
        for e in self.excluded:
            rows.append(f"{e.name[:28]:<28} {e.kind[:10]:<10} {e.weights:>9,} left dense, outside "
                        f"the budgets: {e.reason}")
        if self.fixed_macs:
            rows.append(f"{'(fixed: no prunable weight)':<28} {'':<10} {'':>9} {'':>9} "
                        f"{self.fixed_macs:>12,.0f} {self.fixed_macs:>12,.0f}")
        return "\n".join(rows)

    def summary(self) -> str:
        """A few lines: budgets, achieved fractions, gap and times."""
        fb = "-" if self.flops_budget is None else f"{self.flops_budget:.3f}"
        nb = "-" if self.nnz_budget is None else f"{self.nnz_budget:.3f}"
        gap = "-" if self.ilp_gap is None else f"{self.ilp_gap:.3g}"
        times = ", ".join(f"{k} {v:.1f}s" for k, v in self.times.items())
        text = (f"method {self.method}: FLOPs kept {self.flops_fraction:.4f} (budget {fb}), "
                f"weights kept {self.nnz_fraction:.4f} (budget {nb}), ILP gap {gap}\n"
                f"time: {times}; peak memory {self.peak_rss_mb:.0f} MiB")
        if self.excluded:
            text += (f"\n{len(self.excluded)} layer(s) left dense and outside the budgets: "
                     + ", ".join(e.name for e in self.excluded) + " (see table())")
        return text

    def to_dict(self) -> dict:
        """JSON-ready dictionary (without the model)."""
        return {
            "method": self.method, "config": self.config.to_dict(),
            "flops_budget": self.flops_budget, "nnz_budget": self.nnz_budget,
            "flops_fraction": self.flops_fraction, "nnz_fraction": self.nnz_fraction,
            "dense_macs": self.dense_macs, "fixed_macs": self.fixed_macs,
            "num_weights": self.num_weights,
            "ilp_gap": self.ilp_gap, "ilp_upper_bound": self.ilp_upper_bound,
            "times": self.times, "peak_rss_mb": self.peak_rss_mb, "details": self.details,
            "stages": self.stages, "layers": [asdict(r) for r in self.layers],
            "excluded": [asdict(e) for e in self.excluded],
        }

    def write_trajectory(self, path: str | Path) -> Path:
        """Write the per-stage trajectory (falcon++) as CSV or JSON, by the file suffix."""
        return write_rows(self.stages, path)


@dataclass
class GradualResult:
    """What ``gradual`` returns: the pruned, fine-tuned ``model`` (masks attached), the
    ``config`` used, its kept fractions (recounted), the ``history`` (one row per pruning
    step and per epoch) and seconds per phase."""

    model: nn.Module
    config: GradualConfig
    flops_budget: float | None
    nnz_budget: float | None
    flops_fraction: float
    nnz_fraction: float
    history: list[dict]
    times: dict[str, float] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.config.step.method

    def write_history(self, path: str | Path) -> Path:
        """The history as CSV or JSON (by suffix)."""
        return write_rows(self.history, path)


def write_rows(rows: list[dict], path: str | Path) -> Path:
    """Write a list of flat dicts as ``.csv`` or ``.json`` (by suffix); returns the path."""
    path = Path(path)
    if path.suffix not in (".csv", ".json"):
        raise ConfigError(f"{path}: write to a .csv or a .json file")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=1, default=str))
        return path
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    return path


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024
