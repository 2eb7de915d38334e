"""Does ``round_to`` make structured ResNet20 faster? Structured falcon++ at one FLOP
budget without ``round_to`` and with each value given, accuracy after BatchNorm
re-estimation on the 846 shared test images, and latency as a fraction of the dense
network's (torch eager and ONNX Runtime, batch 1 and 64, interleaved in one process,
median of repeats; the latency code of ``structured_speed.py``).

    python benchmarks/round_to_latency.py --flops 0.5 --round-to 8 16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from isolated import provenance, write_results
from structured_speed import data, latencies, macs_params, resnet20


def main() -> None:
    import falcon_prune as fp

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flops", type=float, default=0.5)
    ap.add_argument("--round-to", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/round_to_latency.json"))
    a = ap.parse_args()
    prov = provenance()
    train, test = data()
    base = resnet20()
    dense = macs_params(base, train[0][:1])
    models, rows = {"dense": base}, []
    for k in [None, *a.round_to]:
        t = time.perf_counter()
        r = fp.prune(base, train, flops=a.flops, method="falcon++", structure="channels",
                     recalibrate_bn=1000, seed=a.seed, progress=False,
                     **({} if k is None else {"round_to": k}))
        macs, params = macs_params(r.model, train[0][:1])
        rows.append({"round_to": k, "seconds": time.perf_counter() - t,
                     "accuracy_bn": fp.evaluate(r.model, test).metric,
                     "flops_fraction": macs / dense[0], "params_fraction": params / dense[1],
                     "conv_widths": [m.out_channels for m in r.model.modules()
                                     if isinstance(m, torch.nn.Conv2d)]})
        models[k] = r.model
        print(rows[-1], flush=True)
    lat = latencies(models, (3, 32, 32), (1, 64), a.repeats)
    for row in rows:
        row["latency_ratio"] = {b: lat[row["round_to"]][b] / lat["dense"][b]
                                for b in lat["dense"]}
        print(row["round_to"], {b: round(v, 3) for b, v in row["latency_ratio"].items()})
    write_results(a.out, {"command": " ".join(["python", *sys.argv]),
                          "latency_dense_seconds": lat["dense"], "rows": rows}, prov)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
