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
the command, the settings actually used (``config``) and the provenance of the run; the
file's ``provenance`` is that of the latest run, ``earlier_provenance`` those before).
Settings that ``--method`` does not use (``--n-gradients`` for mp, ``--n-validation`` for
woodfisher/chita, ``--max-iter`` for methods without solver options) are not passed on.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from isolated import previous, provenance, write_results


def run(a: argparse.Namespace) -> dict:
    import torch

    import falcon_prune as fp
    from falcon_prune.models import create_model, load_checkpoint
    from falcon_prune.results import peak_rss_mb

    torch.manual_seed(a.seed)
    model = create_model(a.model)
    if a.checkpoint:
        model = load_checkpoint(model, a.checkpoint)
    model.eval()
    base = fp.defaults(a.method)
    n_validation = a.n_validation if base.n_validation is not None else 0
    n = a.n_gradients + n_validation
    g = torch.Generator().manual_seed(a.seed)
    x = torch.randn(n, 3, 224, 224, generator=g)
    y = torch.randint(0, 1000, (n,), generator=g)
    # only the settings the method uses (prune refuses the others)
    settings: dict = {}
    if base.n_gradients is not None:
        settings["n_gradients"] = a.n_gradients
        if a.memory_limit_gb is not None:
            settings["memory_limit"] = int(a.memory_limit_gb * 2**30)
    if base.n_validation is not None:
        settings["n_validation"] = n_validation
    if base.solver is not None and a.max_iter is not None:
        settings["solver"] = base.solver.replace(max_iter=a.max_iter)
    t = time.perf_counter()
    r = fp.prune(model, (x, y), flops=a.flops, nnz=a.nnz, method=a.method, device=a.device,
                 seed=a.seed, progress=not a.no_progress, **settings)
    seconds = time.perf_counter() - t
    kept, dense = fp.count_macs(r.model, x[:1])  # folds the masks in a copy
    cfg = r.config
    return {
        "model": a.model, "method": a.method, "flops_budget": a.flops, "nnz_budget": a.nnz,
        "n_gradients": cfg.n_gradients, "n_validation": cfg.n_validation,
        "max_iter": cfg.solver.max_iter if cfg.solver is not None else None,
        "device": a.device, "num_weights": r.num_weights, "dense_macs": r.dense_macs,
        "flops_fraction": r.flops_fraction, "flops_recount": kept / dense,
        "nnz_fraction": r.nnz_fraction, "ilp_gap": r.ilp_gap,
        "ilp_relative_gap": (r.ilp_gap / r.ilp_upper_bound) if r.ilp_upper_bound else None,
        "seconds": seconds, "times": r.times, "peak_rss_mb": peak_rss_mb(),
        "storage": r.details.get("storage"), "iterations": r.details.get("iterations"),
        "torch_threads": torch.get_num_threads(), "config": cfg.to_dict(),
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
                    help="held-out samples for falcon's choices (0: it uses Q); only for "
                         "falcon and falcon++")
    ap.add_argument("--max-iter", type=int, default=None,
                    help="IHT iterations (default: the method's, 30 for falcon)")
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
    prov = provenance()
    argv = [x for x in sys.argv[1:] if x != "--single"]
    proc = subprocess.run([sys.executable, __file__, *argv, "--single"], stdout=subprocess.PIPE,
                          text=True, check=True)
    row = json.loads(proc.stdout.split("RESULT ", 1)[1])
    row["command"] = "python benchmarks/scale_imagenet.py " + " ".join(argv)
    row["provenance"] = prov  # rows of several runs share the file
    print(json.dumps(row, indent=1))
    before = previous(a.out) if a.out.exists() else {"rows": [], "provenance": []}
    write_results(a.out, {"rows": [*before["rows"], row]}, prov, before["provenance"])
    print(f"appended to {a.out}")


if __name__ == "__main__":
    main()
