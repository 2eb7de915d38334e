"""ResNet20 at Torch-Pruning's measured latency: our latency budget against TP's L1 network.

For every seed, in one process: Torch-Pruning's L1 criterion (global pruning, the ratio
bisected until the recounted MACs meet ``--flops`` of the dense network's) gives a network;
its eager time at batch ``--batch`` is measured against the dense network's (interleaved,
median of ``--repeats``), and that fraction becomes our latency budget:
``prune(structure="channels", method="falcon++", flops=..., latency=<TP's fraction>,
latency_batch=..., recalibrate_bn=1000, seed=seed)``. At the end of the seed the dense,
Torch-Pruning's and our network are measured in turn again (the same way), and both
pruned networks' accuracy on the 846 test images is taken after BatchNorm re-estimation
on the first 1,000 training images (the same code for both).

    python benchmarks/latency_match.py --seeds 0 1 2 --out benchmarks/results/latency_match.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from isolated import write_results
from structured_speed import (
    accuracies,
    interleaved,
    macs_params,
    shared_resnet20,
    tp_at_budget,
)


def eager_fractions(models: dict, batch: int, repeats: int) -> dict:
    """{name: eager seconds per forward at ``batch`` / the ``"dense"`` entry's}, every
    network timed in turn in each repeat (one process, median of ``repeats``)."""
    x = torch.randn(batch, 3, 32, 32)
    with torch.inference_mode():
        secs = interleaved({k: (m, x) for k, m in models.items()}, repeats)
    return {k: s / secs["dense"] for k, s in secs.items()} | {"dense_ms": secs["dense"] * 1e3}


def one_seed(seed: int, base, train, test, dense, a) -> dict:
    """Torch-Pruning L1's network, ours at its measured latency, both measured again."""
    import falcon_prune as fp

    t = time.perf_counter()
    tp_model, ratio = tp_at_budget(base, "L1", a.flops, True, train, dense[0])
    tp_seconds = time.perf_counter() - t
    measured = eager_fractions({"dense": base, "tp": tp_model}, a.batch, a.repeats)["tp"]
    budget = min(1.0, measured)  # a busy machine can time TP's network above the dense one
    t = time.perf_counter()
    r = fp.prune(base, train, flops=a.flops, method="falcon++", structure="channels",
                 latency=budget, latency_batch=a.batch, recalibrate_bn=1000, seed=seed,
                 progress=False)
    ours_seconds = time.perf_counter() - t
    final = eager_fractions({"dense": base, "tp": tp_model, "ours": r.model}, a.batch,
                            a.repeats)
    row = {"seed": seed, "tp_measured_fraction": measured, "latency_budget": budget,
           "final_latency": final}
    for name, model, extra in (("tp", tp_model, {"pruning_ratio": ratio,
                                                 "seconds": tp_seconds}),
                               ("ours", r.model, {"seconds": ours_seconds,
                                                  "latency_in_run": r.details.get("latency"),
                                                  "config": r.config.to_dict()})):
        macs, params = macs_params(model, train[0])
        row[name] = {"flops_fraction": macs / dense[0], "params_fraction": params / dense[1],
                     **accuracies(model, train, test, 0, 0.0, seed), **extra}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--flops", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/latency_match.json"))
    a = ap.parse_args()
    prov, train, test, base, dense = shared_resnet20()
    record = {"command": " ".join(["python", *sys.argv]), "rows": []}
    for seed in a.seeds:
        row = one_seed(seed, base, train, test, dense, a)
        record["rows"].append(row)
        write_results(a.out, record, prov)
        print(f"seed {seed}: budget {row['latency_budget']:.3f} | TP L1 BN "
              f"{row['tp']['accuracy_bn']:.4f} at {row['final_latency']['tp']:.3f} | ours BN "
              f"{row['ours']['accuracy_bn']:.4f} at {row['final_latency']['ours']:.3f} "
              f"(FLOPs {row['ours']['flops_fraction']:.3f})", flush=True)
    rows = record["rows"]
    record["summary"] = {
        k: {"accuracy_bn_median": statistics.median(r[k]["accuracy_bn"] for r in rows),
            "latency_median": statistics.median(r["final_latency"][k] for r in rows)}
        for k in ("tp", "ours")}
    record["summary"]["ours_at_least_tp_every_seed"] = all(
        r["ours"]["accuracy_bn"] >= r["tp"]["accuracy_bn"] for r in rows)
    write_results(a.out, record, prov)
    print(json.dumps(record["summary"]))


if __name__ == "__main__":
    main()
