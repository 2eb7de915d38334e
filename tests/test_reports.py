"""Plots, markdown summaries and row files of pruning runs."""

import csv
import json

import pytest

from falcon_prune.errors import ConfigError
from falcon_prune.reports import (
    HISTORY_COLUMNS,
    TRAJECTORY_COLUMNS,
    markdown_summary,
    markdown_table,
    plot_accuracy_vs_flops,
    plot_trajectory,
)
from falcon_prune.results import write_rows


@pytest.fixture
def matplotlib():
    return pytest.importorskip("matplotlib",
                               reason="plots need matplotlib (pip install '.[plots]')")


def is_png(path):
    return path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 1000


def test_accuracy_plot_and_trajectory_plot(matplotlib, tmp_path):
    rows = [{"method": m, "flops_fraction": f, "accuracy": a, "seed": s}
            for m, base in (("mp", 0.5), ("falcon", 0.7)) for f in (0.2, 0.3, 0.4)
            for s, a in enumerate((base + f, base + f + 0.01, base + f - 0.02))]
    png = plot_accuracy_vs_flops(rows, tmp_path / "acc.png")
    assert png == tmp_path / "acc.png" and is_png(png)
    stages = [{"stage": k, "flops_fraction": 1 - 0.2 * k, "nnz_fraction": 1 - 0.25 * k,
               "held_out_loss": 0.1 * k, "held_out_accuracy": 1 - 0.05 * k} for k in (1, 2, 3)]
    assert is_png(plot_trajectory(stages, tmp_path / "sub" / "t.png"))
    with pytest.raises(ValueError, match="no rows"):
        plot_trajectory([], tmp_path / "empty.png")
    assert not (tmp_path / "empty.png").exists()


def test_gradual_history_plot(matplotlib, tmp_path):
    """gradual's rows: one per event, eval_accuracy for the classification task; rows of a
    task without a metric plot too."""
    history = [{"event": k, "phase": "finetune", "flops_fraction": 1 - 0.1 * k,
                "nnz_fraction": 1 - 0.1 * k, "train_loss": 1 / (k + 1),
                "eval_accuracy": 0.5 + 0.05 * k} for k in range(4)]
    assert is_png(plot_trajectory(history, tmp_path / "g.png", title="gradual"))
    no_metric = [{k: v for k, v in r.items() if k != "eval_accuracy"} for r in history]
    assert is_png(plot_trajectory(no_metric, tmp_path / "n.png"))


def test_markdown():
    rows = [{"stage": 1, "flops_budget": 0.5, "flops_fraction": 0.5, "nnz_fraction": 0.6}]
    text = markdown_table(rows, TRAJECTORY_COLUMNS)
    assert text.splitlines()[0].startswith("| stage | FLOP budget")
    assert "| 1 | 0.500 | 0.5000 | 0.6000 | - |" in text
    doc = markdown_summary("run", {"method": "falcon++"}, rows, TRAJECTORY_COLUMNS)
    assert doc.startswith("# run\n\n- method: falcon++")
    history = [{"event": 2, "phase": "prune", "stage": 1, "flops_fraction": 0.4,
                "eval_accuracy": 0.875}]
    table = markdown_table(history, HISTORY_COLUMNS).splitlines()
    assert len(table) == 3 and "eval acc." in table[0]
    assert table[2] == "| 2 | prune | 1 | - | 0.4000 | - | - | 0.8750 | - |"


def test_write_rows_csv_and_json(tmp_path):
    rows = [{"stage": 1, "flops_fraction": 0.5}, {"stage": 2, "held_out_loss": 0.25}]
    path = write_rows(rows, tmp_path / "out" / "t.json")
    assert json.loads(path.read_text()) == rows
    path = write_rows(rows, tmp_path / "t.csv")
    with path.open() as fh:
        read = list(csv.DictReader(fh))
    assert list(read[0]) == ["stage", "flops_fraction", "held_out_loss"]  # keys of all rows
    assert read[1] == {"stage": "2", "flops_fraction": "", "held_out_loss": "0.25"}
    with pytest.raises(ConfigError, match=r"\.csv or a \.json"):
        write_rows(rows, tmp_path / "t.txt")
