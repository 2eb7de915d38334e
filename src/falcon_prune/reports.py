"""Plots (PNG, matplotlib optional) and markdown summaries of pruning runs.

Rows are flat dicts as written by the benchmarks (``method``, ``flops_fraction``,
``accuracy``, ...) or by ``PruneResult.stages`` / ``GradualResult.history``.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from falcon_prune.errors import DataError, DependencyError


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise DependencyError(
            "plots need matplotlib: pip install 'falcon-prune[plots]' (or matplotlib)"
        ) from e
    return plt


def plot_accuracy_vs_flops(
    rows: Sequence[dict], path: str | Path, accuracy_key: str = "accuracy",
    title: str = "accuracy versus FLOPs kept",
) -> Path:
    """One line per method: median accuracy (over seeds) against the kept FLOP fraction,
    with the min-max range as error bars. Writes a PNG and returns its path."""
    plt = _pyplot()
    by = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by[r["method"]][round(r["flops_fraction"], 3)].append(100 * r[accuracy_key])
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, points in by.items():
        xs = sorted(points)
        med = [statistics.median(points[x]) for x in xs]
        lo = [m - min(points[x]) for m, x in zip(med, xs, strict=True)]
        hi = [max(points[x]) - m for m, x in zip(med, xs, strict=True)]
        ax.errorbar(xs, med, yerr=[lo, hi], marker="o", capsize=3, label=method)
    ax.set_xlabel("fraction of FLOPs kept")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_trajectory(rows: Sequence[dict], path: str | Path, title: str = "trajectory") -> Path:
    """Kept FLOP/NNZ fractions and loss/accuracy per stage (falcon++) or per event
    (gradual). Writes a PNG and returns its path."""
    plt = _pyplot()
    if not rows:
        raise DataError("no rows to plot: the run has no stages")
    step_key = "event" if "event" in rows[0] else "stage"
    xs = [r[step_key] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(xs, [r["flops_fraction"] for r in rows], marker="o", label="FLOPs kept")
    a1.plot(xs, [r["nnz_fraction"] for r in rows], marker="s", label="weights kept")
    a1.set_xlabel(step_key)
    a1.set_ylabel("fraction kept")
    a1.grid(alpha=0.3)
    a1.legend()
    for key, label in (("held_out_accuracy", "held-out accuracy"),
                       ("eval_accuracy", "eval accuracy")):
        pts = [(x, 100 * r[key]) for x, r in zip(xs, rows, strict=True) if key in r]
        if pts:
            a2.plot(*zip(*pts, strict=True), marker="o", label=label)
    a2.set_ylabel("accuracy (%)")
    a2.set_xlabel(step_key)
    losses = [(x, r.get("train_loss", r.get("held_out_loss")))
              for x, r in zip(xs, rows, strict=True)]
    losses = [(x, v) for x, v in losses if v is not None]
    if losses:
        a3 = a2.twinx()
        a3.plot(*zip(*losses, strict=True), color="gray", linestyle="--", label="loss")
        a3.set_ylabel("loss")
    a2.grid(alpha=0.3)
    if a2.get_legend_handles_labels()[0]:
        a2.legend(loc="lower left")
    fig.suptitle(title)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    fig.clf()
    return path


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """A markdown table; ``columns`` are (key, header, format spec) triples."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, rule]
    for r in rows:
        cells = []
        for key, _, spec in columns:
            v = r.get(key)
            cells.append("-" if v is None else format(v, spec))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


TRAJECTORY_COLUMNS = (
    ("stage", "stage", "d"), ("flops_budget", "FLOP budget", ".3f"),
    ("flops_fraction", "FLOPs kept", ".4f"), ("nnz_fraction", "NNZ kept", ".4f"),
    ("held_out_loss", "held-out loss", ".4f"), ("held_out_accuracy", "held-out acc.", ".4f"),
    ("seconds", "s", ".1f"),
)
HISTORY_COLUMNS = (
    ("event", "event", "d"), ("phase", "phase", "s"), ("stage", "stage", "d"),
    ("epoch", "epoch", "d"), ("flops_fraction", "FLOPs kept", ".4f"),
    ("nnz_fraction", "NNZ kept", ".4f"), ("train_loss", "train loss", ".4f"),
    ("eval_accuracy", "eval acc.", ".4f"), ("seconds", "s", ".1f"),
)


def markdown_summary(title: str, facts: dict, rows: Sequence[dict],
                     columns: Sequence[tuple[str, str, str]]) -> str:
    """A markdown report: a title, a bullet list of ``facts`` and a table of ``rows``."""
    bullets = "\n".join(f"- {k}: {v}" for k, v in facts.items())
    return f"# {title}\n\n{bullets}\n\n{markdown_table(rows, columns)}\n"
