import pytest

from falcon_prune.reports import (
    TRAJECTORY_COLUMNS,
    markdown_summary,
    markdown_table,
    plot_accuracy_vs_flops,
    plot_trajectory,
)

pytest.importorskip("matplotlib", reason="plots need matplotlib (pip install '.[plots]')")


def test_accuracy_plot_and_trajectory_plot(tmp_path):
    rows = [{"method": m, "flops_fraction": f, "accuracy": a, "seed": s}
            for m, base in (("mp", 0.5), ("falcon", 0.7)) for f in (0.2, 0.3, 0.4)
            for s, a in enumerate((base + f, base + f + 0.01, base + f - 0.02))]
    png = plot_accuracy_vs_flops(rows, tmp_path / "acc.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    stages = [{"stage": k, "flops_fraction": 1 - 0.2 * k, "nnz_fraction": 1 - 0.25 * k,
               "held_out_loss": 0.1 * k, "held_out_accuracy": 1 - 0.05 * k} for k in (1, 2, 3)]
    assert plot_trajectory(stages, tmp_path / "t.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="no rows"):
        plot_trajectory([], tmp_path / "empty.png")


def test_markdown():
    rows = [{"stage": 1, "flops_budget": 0.5, "flops_fraction": 0.5, "nnz_fraction": 0.6}]
    text = markdown_table(rows, TRAJECTORY_COLUMNS)
    assert text.splitlines()[0].startswith("| stage | FLOP budget")
    assert "| 1 | 0.500 | 0.5000 | 0.6000 | - |" in text
    doc = markdown_summary("run", {"method": "falcon++"}, rows, TRAJECTORY_COLUMNS)
    assert doc.startswith("# run\n\n- method: falcon++")
