"""Latency budgets on the shared CIFAR-10 ResNet20: accuracy against measured latency.

At one FLOP budget (``--flops``, default 0.5) it prunes with
``prune(structure="channels", method="falcon++", recalibrate_bn=1000, latency=L,
latency_batch=64)`` for every ``L`` of ``--latencies``, and once without a latency budget;
for comparison Torch-Pruning's L1, L2 and Taylor criteria (global pruning, the ratio
bisected until the recounted MACs meet the budget) at ``--flops`` and at each budget of
``--tp-flops`` (a lower FLOP budget is how Torch-Pruning gets a faster network). Every
network: recounted MACs and parameters, accuracy on the 846 test images after BatchNorm
re-estimation and after the same fine-tuning as ``structured_speed.py``, and CPU latency
at batch 1 and 64 in torch eager and ONNX Runtime, all networks measured in turn in every
repeat, in one process, median of ``--repeats``.

    python benchmarks/latency_budget.py --out benchmarks/results/latency_budget.json \\
        --plot benchmarks/results/latency_budget.png
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from isolated import write_results
from structured_speed import (
    accuracies,
    latencies,
    macs_params,
    plot,
    shared_resnet20,
    tp_at_budget,
)


def ours(base, train, test, flops: float, latency: float | None, dense, a) -> tuple[dict, object]:
    """Our network at ``flops`` (and ``latency`` when given) and its row."""
    import falcon_prune as fp

    t = time.perf_counter()
    extra = {} if latency is None else {"latency": latency, "latency_batch": 64}
    r = fp.prune(base, train, flops=flops, method="falcon++", structure="channels",
                 recalibrate_bn=1000, seed=a.seed, progress=False, **extra)
    seconds = time.perf_counter() - t
    macs, params = macs_params(r.model, train[0])
    row = {"network": "resnet20", "method": "falcon-prune falcon++", "flops_budget": flops,
           "latency_budget": latency,
           "macs": macs, "flops_fraction": macs / dense[0], "params": params,
           "params_fraction": params / dense[1], "seconds": seconds,
           "latency_in_run": r.details.get("latency"), "config": r.config.to_dict(),
           **accuracies(r.model, train, test, a.ft_epochs, a.ft_lr, a.seed)}
    return row, r.model


def theirs(base, train, test, name: str, flops: float, dense, a) -> tuple[dict, object]:
    """Torch-Pruning's criterion ``name`` (global pruning) at ``flops`` and its row."""
    t = time.perf_counter()
    m, ratio = tp_at_budget(base, name, flops, True, train, dense[0])
    macs, params = macs_params(m, train[0])
    row = {"network": "resnet20", "method": f"torch-pruning {name} global",
           "flops_budget": flops,
           "pruning_ratio": ratio, "macs": macs, "flops_fraction": macs / dense[0],
           "params": params, "params_fraction": params / dense[1],
           "seconds": time.perf_counter() - t,
           **accuracies(m, train, test, a.ft_epochs, a.ft_lr, a.seed)}
    return row, m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flops", type=float, default=0.5)
    ap.add_argument("--latencies", type=float, nargs="+", default=[0.75, 0.65])
    ap.add_argument("--tp-flops", type=float, nargs="*", default=[0.3])
    ap.add_argument("--criteria", nargs="+", default=["L1", "L2", "Taylor"])
    ap.add_argument("--ft-epochs", type=int, default=3)
    ap.add_argument("--ft-lr", type=float, default=0.01)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/latency_budget.json"))
    ap.add_argument("--plot", type=Path, default=None)
    a = ap.parse_args()
    prov, train, test, base, dense = shared_resnet20()
    rows = [{"network": "resnet20", "method": "dense", "macs": dense[0], "params": dense[1],
             **accuracies(base, train, test, 0, a.ft_lr, a.seed)}]
    record = {"command": " ".join(["python", *sys.argv]), "rows": rows}
    models = {0: base}
    for latency in [None, *a.latencies]:
        row, models[len(rows)] = ours(base, train, test, a.flops, latency, dense, a)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "config"}, default=str),
              flush=True)
        write_results(a.out, record, prov)
    for flops in [a.flops, *a.tp_flops]:
        for name in a.criteria:
            row, models[len(rows)] = theirs(base, train, test, name, flops, dense, a)
            rows.append(row)
            print(json.dumps(row), flush=True)
            write_results(a.out, record, prov)
    lat = latencies(models, (3, 32, 32), (1, 64), a.repeats)  # last: nothing else runs
    for i, row in enumerate(rows):
        row["latency"] = lat[i]
        row["latency_ratio"] = {k: lat[i][k] / lat[0][k] for k in lat[i]}
        label = row["method"] + (f", latency={row['latency_budget']}"
                                 if row.get("latency_budget") else "")
        print(f"{label:<40} FLOPs {row.get('flops_fraction', 1):.3f} BN "
              f"{row['accuracy_bn']:.4f} FT {row.get('accuracy_finetuned', 0):.4f} latency",
              {k: round(v, 3) for k, v in row["latency_ratio"].items()}, flush=True)
    write_results(a.out, record, prov)
    if a.plot:
        plot(rows[1:], a.plot)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
