"""Markdown table (medians over seeds, accuracy range) from a benchmark JSON file, and
optionally the accuracy-versus-FLOPs plot; a line under the table says where the rows come
from (the file's ``provenance``).

    python benchmarks/table.py benchmarks/results/oneshot_resnet20.json \
        --plot benchmarks/results/oneshot_resnet20.png
"""

import argparse
import json
from collections import defaultdict
from pathlib import Path
from statistics import median


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--plot", type=Path, help="also plot accuracy versus FLOPs kept (PNG)")
    ap.add_argument("--methods", nargs="+", help="only these methods (rows' exact labels)")
    a = ap.parse_args()
    saved = json.loads(a.results.read_text())
    rows = saved["rows"]
    if a.methods:
        rows = [r for r in rows if r["method"] in a.methods]
        if not rows:
            raise SystemExit(f"no rows for methods {a.methods} in {a.results}")
    groups = defaultdict(list)
    for r in rows:
        groups[(r["flops_budget"], r["method"])].append(r)
    print("| FLOPs budget | method | accuracy (min-max) | FLOPs kept (recount) | NNZ kept "
          "| seconds | peak MiB | seeds |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for (budget, method), rs in sorted(groups.items(), key=lambda kv: -kv[0][0]):
        def m(key, rs=rs):
            return median(r[key] for r in rs)

        accs = [r["accuracy"] for r in rs]
        spread = f" ({min(accs):.1%}-{max(accs):.1%})" if min(accs) != max(accs) else ""
        print(f"| {budget:.0%} | {method} | {m('accuracy'):.1%}{spread} "
              f"| {m('flops_fraction'):.4f} ({m('flops_recount'):.4f}) | {m('nnz_fraction'):.4f} "
              f"| {m('seconds'):.1f} | {m('peak_rss_mb'):.0f} | {len(rs)} |")
    if "provenance" in saved:
        print(f"\n{describe(saved['provenance'])}")
    if a.plot:
        from falcon_prune.reports import plot_accuracy_vs_flops

        print(f"wrote {plot_accuracy_vs_flops(rows, a.plot, title=a.results.stem)}")


def describe(prov: dict) -> str:
    """One line of a results file's provenance."""
    commit = str(prov.get("commit", "?"))[:12] + (" (dirty)" if prov.get("dirty") is True else "")
    text = (f"commit {commit}, {prov.get('date', '?')}; torch {prov.get('torch', '?')}, "
            f"Python {prov.get('python', '?')}; {prov.get('cpu', '?')}, "
            f"{prov.get('cores', '?')} cores")
    if prov.get("backfilled"):
        text += f" (backfilled {prov['backfilled']})"
    return text


if __name__ == "__main__":
    main()
