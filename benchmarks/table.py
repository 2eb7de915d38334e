"""Markdown table (medians over seeds, accuracy range) from a one-shot benchmark JSON file.

    python benchmarks/table.py benchmarks/results/oneshot_resnet20.json
"""

import json
import sys
from collections import defaultdict
from statistics import median

rows = json.load(open(sys.argv[1]))["rows"]
groups = defaultdict(list)
for r in rows:
    groups[(r["flops_budget"], r["method"])].append(r)
print("| FLOPs budget | method | accuracy | FLOPs kept (recount) | NNZ kept | seconds | peak MiB "
      "| seeds |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for (budget, method), rs in sorted(groups.items(), key=lambda kv: (-kv[0][0], 0)):
    def m(key, rs=rs):
        return median(r[key] for r in rs)

    accs = [r["accuracy"] for r in rs]
    spread = f" ({min(accs):.1%}-{max(accs):.1%})" if len(rs) > 1 else ""
    print(f"| {budget:.0%} | {method} | {m('accuracy'):.1%}{spread} | {m('flops_fraction'):.4f} "
          f"({m('flops_recount'):.4f}) | {m('nnz_fraction'):.4f} | {m('seconds'):.1f} "
          f"| {m('peak_rss_mb'):.0f} | {len(rs)} |")
