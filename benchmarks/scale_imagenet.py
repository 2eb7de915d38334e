"""One-shot FALCON on ImageNet-size networks: time per phase and peak memory.

ImageNet is not available here, so the data are synthetic: seeded N(0, 1) images of
224 x 224 with seeded random labels (the gradients have ImageNet's shapes and cost; their
values say nothing about accuracy). Weights are the zoo's seeded initialisation unless
``--checkpoint`` is given. Each run is its own process so that its peak resident memory
(``ru_maxrss``) is its own; the library chooses where the gradient matrix lives from
``--memory-limit-gb`` (default: its own default, 60 % of the available RAM) and says so.

    python benchmarks/scale_imagenet.py --model resnet50 --flops 0.2 --n-gradients 128
    python benchmarks/scale_imagenet.py --model mobilenet_v1 --flops 0.3 --n-gradients 500

Results are appended to ``benchmarks/results/scale_imagenet.json`` (one row per run, with
the command and the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


def run(a: argparse.Namespace) -> dict:
    import torch

    import falcon_prune as fp
    from falcon_prune.models import create_model, load_checkpoint

    torch.manual_seed(a.seed)
    model = create_model(a.model)
    if a.checkpoint:
        model = load_checkpoint(model, a.checkpoint)
    model.eval()
    n = a.n_gradients + a.n_validation
    g = torch.Generator().manual_seed(a.seed)
    x = torch.randn(n, 3, 224, 224, generator=g)
    y = torch.randint(0, 1000, (n,), generator=g)
    opts = fp.SolverOptions(max_iter=a.max_iter, progress=not a.no_progress)
    limit = None if a.memory_limit_gb is None else int(a.memory_limit_gb * 2**30)
    t = time.perf_counter()
    r = fp.prune(model, (x, y), flops=a.flops, nnz=a.nnz, method=a.method,
                 n_gradients=a.n_gradients, n_validation=a.n_validation, options=opts,
                 memory_limit=limit, device=a.device, seed=a.seed,
                 progress=not a.no_progress)
    seconds = time.perf_counter() - t
    kept, dense = fp.count_macs(fp.make_permanent(fp.api.clone_model(r.model)), x[:1])
    return {
        "model": a.model, "method": a.method, "flops_budget": a.flops, "nnz_budget": a.nnz,
        "n_gradients": a.n_gradients, "n_validation": a.n_validation, "max_iter": a.max_iter,
        "device": a.device, "num_weights": r.num_weights, "dense_macs": r.dense_macs,
        "flops_fraction": r.flops_fraction, "flops_recount": kept / dense,
        "nnz_fraction": r.nnz_fraction, "ilp_gap": r.ilp_gap,
        "ilp_relative_gap": (r.ilp_gap / r.ilp_upper_bound) if r.ilp_upper_bound else None,
        "seconds": seconds, "times": r.times, "peak_rss_mb": fp.api.peak_rss_mb(),
        "storage": r.details.get("storage"), "iterations": r.details.get("iterations"),
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet50", choices=["resnet50", "mobilenet_v1"])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--method", default="falcon")
    ap.add_argument("--flops", type=float, default=0.2)
    ap.add_argument("--nnz", type=float, default=None)
    ap.add_argument("--n-gradients", type=int, default=128)
    ap.add_argument("--n-validation", type=int, default=0,
                    help="held-out samples for falcon's choices (0: it uses Q)")
    ap.add_argument("--max-iter", type=int, default=30)
    ap.add_argument("--memory-limit-gb", type=float, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/scale_imagenet.json"))
    ap.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.single:
        print("RESULT " + json.dumps(run(a)))
        return
    argv = [x for x in sys.argv[1:] if x != "--single"]
    proc = subprocess.run([sys.executable, __file__, *argv, "--single"], stdout=subprocess.PIPE,
                          text=True, check=True)
    row = json.loads(proc.stdout.split("RESULT ", 1)[1])
    row["command"] = "python benchmarks/scale_imagenet.py " + " ".join(argv)
    row["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}"
    print(json.dumps(row, indent=1))
    rows = json.loads(a.out.read_text())["rows"] if a.out.exists() else []
    rows.append(row)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"rows": rows}, indent=1))
    print(f"appended to {a.out}")


if __name__ == "__main__":
    main()
