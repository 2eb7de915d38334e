"""ILP at ImageNet scale: ResNet50's 25.5 M prunable weights with its per-layer FLOP costs.

Compares ``falcon_prune.solve_ilp`` with a re-implementation of the reference algorithm:
golden-section search on the FLOP multiplier t, where every trial t re-orders all p reduced
scores I_i - t f_i by merging the per-layer sorted lists (numpy's stable sort, which merges
pre-sorted runs), takes the S best positive ones for D(t), and finally keeps the longest
prefix in that order that meets both budgets.
Scores are w^2 of ResNet50's (seeded) initial weights; budgets: 20 % of the FLOPs and 30 %
of the weights kept.

    python benchmarks/ilp_scale.py --repeats 7 --reference-repeats 3

The result is written to ``--out`` with the command and the provenance of the run (commit,
torch, Python, CPU, cores, date; ``isolated.provenance``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from isolated import provenance, write_results

from falcon_prune import CostGroups, CostModel, solve_ilp
from falcon_prune.analysis.costs import flatten_weights
from falcon_prune.models import resnet50


def reference_golden_section(scores: np.ndarray, sizes: list[int], costs: list[float],
                             S: int, F: float, tol: float = 1e-6) -> tuple[np.ndarray, float]:
    """(mask, objective) by golden-section search on t with a full merge per trial."""
    layers, offsets = [], np.cumsum([0, *sizes])
    for a, b in zip(offsets[:-1], offsets[1:], strict=True):
        order = np.argsort(-scores[a:b], kind="stable") + a  # each layer sorted once
        layers.append(order)
    f = np.repeat(np.asarray(costs, dtype=np.float64), sizes)

    def merged(t: float) -> tuple[np.ndarray, np.ndarray]:
        runs = [scores[o] - t * f[o] for o in layers]  # each run descending
        vals = np.concatenate(runs)
        idx = np.concatenate(layers)
        perm = np.argsort(-vals, kind="stable")  # merge of the L sorted runs
        return vals[perm], idx[perm]

    def dual(t: float) -> float:
        vals, _ = merged(t)
        top = vals[:S]
        return t * F + float(top[top > 0].sum())

    lo, hi = 0.0, float((scores / np.maximum(f, 1e-12)).max())
    g = (math.sqrt(5) - 1) / 2
    c, d = hi - g * (hi - lo), lo + g * (hi - lo)
    fc, fd = dual(c), dual(d)
    while hi - lo > tol * max(1.0, hi):
        if fc < fd:
            hi, d, fd = d, c, fc
            c = hi - g * (hi - lo)
            fc = dual(c)
        else:
            lo, c, fc = c, d, fd
            d = lo + g * (hi - lo)
            fd = dual(d)
    t = (lo + hi) / 2
    vals, idx = merged(t)
    # rounding: the longest prefix in reduced-score order that meets both budgets
    ok = (np.arange(1, len(idx) + 1) <= S) & (np.cumsum(f[idx]) <= F * (1 + 1e-12))
    k = len(idx) if ok.all() else int(np.argmin(ok))
    mask = np.zeros(len(scores), dtype=bool)
    mask[idx[:k]] = True
    return mask, float(scores[mask].sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--reference-repeats", type=int, default=1)
    ap.add_argument("--flops", type=float, default=0.2)
    ap.add_argument("--nnz", type=float, default=0.3)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/ilp_scale.json"))
    a = ap.parse_args()
    prov = provenance()
    torch.manual_seed(0)
    model = resnet50().eval()
    cm = CostModel.from_model(model, torch.zeros(1, 3, 224, 224))
    w = flatten_weights(cm, torch.float64)
    scores = w**2
    groups = CostGroups.from_layers(cm.layer_costs(), cm.layer_sizes())
    S, F = int(a.nnz * cm.num_weights), a.flops * cm.dense_macs
    ours = []
    for _ in range(a.repeats):
        t = time.perf_counter()
        r = solve_ilp(scores, groups, S, F)
        ours.append(time.perf_counter() - t)
    assert r.kept <= S and cm.macs_of_mask(r.mask) <= F * (1 + 1e-12)
    ref = []
    for _ in range(a.reference_repeats):
        t = time.perf_counter()
        mask, obj = reference_golden_section(
            scores.numpy(), cm.layer_sizes().tolist(), cm.layer_costs().tolist(), S, F)
        ref.append(time.perf_counter() - t)
    row = {
        "p": cm.num_weights, "layers": len(cm.layers), "distinct_costs": len(groups.cost),
        "nnz_budget": a.nnz, "flops_budget": a.flops,
        "ours_seconds_median": statistics.median(ours), "ours_seconds": ours,
        "ours_objective": r.objective, "ours_upper_bound": r.upper_bound,
        "ours_relative_gap": r.relative_gap,
        "reference_seconds_median": statistics.median(ref), "reference_seconds": ref,
        "reference_objective": obj,
        "reference_feasible": bool(mask.sum() <= S and cm.macs_of_mask(torch.from_numpy(mask))
                                   <= F * (1 + 1e-12)),
    }
    row["speedup"] = row["reference_seconds_median"] / row["ours_seconds_median"]
    print(json.dumps(row, indent=1))
    write_results(a.out, {"command": "python benchmarks/ilp_scale.py " + " ".join(sys.argv[1:]),
                          "result": row}, prov)


if __name__ == "__main__":
    main()
