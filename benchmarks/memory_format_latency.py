"""Structured ResNet20 against dense in torch eager at the two memory formats PyTorch
offers for images: contiguous (NCHW, the default) and ``channels_last`` (NHWC, PyTorch's
advice for CPU inference of convolutions). Structured falcon++ at each FLOP budget (BN
re-estimated on 1,000 training images, seed 0), then the dense and pruned networks in both
formats measured in turn inside every repeat (one process, median of repeats; the timing
of ``structured_speed.py``), batch 1 and 64. Each network is compared with the dense
network in the same format.

    python benchmarks/memory_format_latency.py --budgets 0.5 0.3
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from isolated import provenance, write_results
from structured_speed import data, interleaved, macs_params, resnet20


def eager_latency(models: dict, batch: int, repeats: int) -> dict:
    """{name: median seconds per call} at ``batch``; ``models`` maps a name to (network,
    memory format); every network is timed in turn inside each repeat."""
    with torch.inference_mode():
        return interleaved({k: (m, torch.randn(batch, 3, 32, 32).contiguous(memory_format=f))
                            for k, (m, f) in models.items()}, repeats)


def main() -> None:
    import falcon_prune as fp

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.3])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path,
                    default=Path("benchmarks/results/memory_format_latency.json"))
    a = ap.parse_args()
    prov = provenance()
    train, test = data()
    base = resnet20()
    dense = macs_params(base, train[0][:1])
    nets, rows = {"dense": base}, []
    for f in a.budgets:
        r = fp.prune(base, train, flops=f, method="falcon++", structure="channels",
                     recalibrate_bn=1000, seed=a.seed, progress=False)
        macs, params = macs_params(r.model, train[0][:1])
        rows.append({"flops_budget": f, "flops_fraction": macs / dense[0],
                     "params_fraction": params / dense[1],
                     "accuracy_bn": fp.evaluate(r.model, test).metric})
        nets[f] = r.model
        print(rows[-1], flush=True)
    formats = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    models = {(k, name): (copy.deepcopy(m).eval().to(memory_format=fmt), fmt)
              for k, m in nets.items() for name, fmt in formats.items()}
    dense_seconds = {}
    for b in (1, 64):
        lat = eager_latency(models, b, a.repeats)
        for name in formats:
            dense_seconds[f"{name}_b{b}"] = lat[("dense", name)]
        for row in rows:
            for name in formats:
                row[f"eager_{name}_b{b}"] = lat[(row["flops_budget"], name)] / lat[("dense",
                                                                                    name)]
    for row in rows:
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
    print("dense seconds", dense_seconds)
    write_results(a.out, {"command": " ".join(["python", *sys.argv]),
                          "dense_seconds": dense_seconds, "rows": rows}, prov)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
