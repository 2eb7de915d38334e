"""Gradual pruning of the shared CIFAR-10 ResNet20 with fine-tuning: falcon versus mp.

Protocol (identical for every method, so the training budget is the same): the 4,660 shared
training images (no augmentation), a cubic schedule of ``--stages`` pruning steps from the
dense model to the FLOP budget, ``--epochs-per-stage`` fine-tuning epochs after each step
and ``--final-epochs`` at the target; SGD (momentum 0.9, weight decay 5e-4, batch 128) with
a cosine LR from ``--lr`` to 0 over all epochs; BatchNorm statistics re-estimated after every
pruning step; the pruning steps of methods that use gradients and validation samples
(falcon's, not mp's) use 500 of each, drawn from the training images (seeded). Top-1
accuracy on the 846 shared test images at the end. Each run is its own process; results
are written after every run, each row with the settings the run actually used (``config``:
``GradualResult.config.to_dict()``), the file with the provenance of the run
(``isolated.provenance``).

    python benchmarks/gradual_resnet20.py --budgets 0.2 0.1 --seeds 0 1 2 \
        --out benchmarks/results/gradual_resnet20.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from isolated import provenance, run_isolated, save_rows

SHARED = Path(__file__).resolve().parents[2] / "shared"


def run_one(method: str, flops: float, seed: int, a: argparse.Namespace) -> dict:
    import falcon_prune as fp
    from falcon_prune.data.datasets import load_cifar10
    from falcon_prune.data.evaluation import accuracy
    from falcon_prune.models import load_checkpoint, resnet20
    from falcon_prune.results import peak_rss_mb

    npz = SHARED / "data" / "cifar10_subset.npz"
    model = load_checkpoint(resnet20(), SHARED / "checkpoints" / "resnet20_cifar10.pth.tar")
    train, test = load_cifar10(npz, "train"), load_cifar10(npz, "test")
    # 500 gradients / 500 validation samples for the step methods that use them (mp refuses
    # both)
    step = fp.defaults(method)
    per_method = {k: 500 for k in ("n_gradients", "n_validation")
                  if getattr(step, k) is not None}
    t = time.perf_counter()
    r = fp.gradual(model.eval(), train.tensors, flops=flops, method=method,
                   schedule=fp.Schedule(a.stages, "cubic"), epochs_per_stage=a.epochs_per_stage,
                   final_epochs=a.final_epochs, lr=a.lr, batch_size=128, seed=seed,
                   progress=False, **per_method)
    seconds = time.perf_counter() - t
    kept, dense = fp.count_macs(r.model, train.tensors[0][:1])  # folds the masks in a copy
    return {
        "method": method, "flops_budget": flops, "seed": seed,
        "accuracy": accuracy(r.model, test.tensors), "flops_fraction": r.flops_fraction,
        "flops_recount": kept / dense, "nnz_fraction": r.nnz_fraction, "seconds": seconds,
        "times": r.times, "peak_rss_mb": peak_rss_mb(), "history": r.history,
        "protocol": {"stages": a.stages, "epochs_per_stage": a.epochs_per_stage,
                     "final_epochs": a.final_epochs, "lr": a.lr, "batch_size": 128,
                     "schedule": "cubic", "optimizer": "SGD momentum 0.9 wd 5e-4, cosine"},
        "config": r.config.to_dict(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.2, 0.1])
    ap.add_argument("--methods", nargs="+", default=["mp", "falcon"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--epochs-per-stage", type=int, default=1)
    ap.add_argument("--final-epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/gradual_resnet20.json"))
    ap.add_argument("--single", nargs=3, metavar=("METHOD", "FLOPS", "SEED"),
                    help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.single:
        row = run_one(a.single[0], float(a.single[1]), int(a.single[2]), a)
        print("RESULT " + json.dumps(row))
        return
    if not (SHARED / "checkpoints" / "resnet20_cifar10.pth.tar").exists():
        sys.exit(f"{SHARED} is absent: this benchmark needs the project's shared data")
    prov = provenance()
    rows = []
    forward = ["--stages", str(a.stages), "--epochs-per-stage", str(a.epochs_per_stage),
               "--final-epochs", str(a.final_epochs), "--lr", str(a.lr)]
    for flops in a.budgets:
        for seed in a.seeds:
            for method in a.methods:
                row = run_isolated(__file__, [*forward, "--single", method, str(flops),
                                              str(seed)])
                rows.append(row)
                print(f"{flops:.2f} seed {seed} {method:<7} acc {row['accuracy']:.4f} FLOPs "
                      f"{row['flops_fraction']:.4f} (recount {row['flops_recount']:.4f}) NNZ "
                      f"{row['nnz_fraction']:.4f} {row['seconds']:.0f}s", flush=True)
                save_rows(a.out, rows, prov=prov)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
