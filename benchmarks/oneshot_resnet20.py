"""One-shot pruning of the shared CIFAR-10 ResNet20 at FLOP budgets, every method.

Each (method, budget) runs in its own process so that its peak memory is its own. The
pruned network is recounted independently (``falcon_prune.count_macs``: torch's FLOP
counter over the non-zero weights of the mask-folded copy; non-zeros counted in that copy)
and tested on the 846 shared test images.

    python benchmarks/oneshot_resnet20.py --budgets 0.4 0.3 \
        --out benchmarks/results/oneshot_resnet20.json

``--sampling`` is passed on as ``prune(sampling=...)``: ``random`` lets each seed draw its
own random gradient and validation samples from the training images, ``first`` takes the
first ones whatever the seed. ``--n-gradients`` applies to the methods that use gradients
(the others would refuse it). With ``--recalibrate-bn N`` every method re-estimates the
BatchNorm statistics on N training samples after pruning (``prune(recalibrate_bn=N)``).
``--kwargs JSON`` passes further settings (e.g. an earlier default's), mapped onto ``prune``
arguments by ``isolated.prune_kwargs``, and ``--label TEXT`` tags those rows' method as
``METHOD (TEXT)``; ``--append`` adds the rows to an existing file. Every row records the
settings the run actually used (``config``: ``PruneResult.config.to_dict()``); the file
starts with the provenance of the run (``isolated.provenance``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from isolated import previous, provenance, prune_kwargs, run_isolated, save_rows, unit_seconds

SHARED = Path(__file__).resolve().parents[2] / "shared"
METHODS = ["mp", "mp_flops", "woodfisher", "chita", "falcon", "falcon++"]


def run_one(method: str, flops: float, seed: int, n_gradients: int | None,
            sampling: str, recalibrate_bn: int = 0, kwargs: dict | None = None,
            label: str | None = None) -> dict:
    import torch

    import falcon_prune as fp
    from falcon_prune.analysis.masks import plain_copy
    from falcon_prune.data.datasets import load_cifar10
    from falcon_prune.data.evaluation import accuracy
    from falcon_prune.models import load_checkpoint, resnet20
    from falcon_prune.results import peak_rss_mb

    torch.manual_seed(seed)
    npz = SHARED / "data" / "cifar10_subset.npz"
    model = load_checkpoint(resnet20(), SHARED / "checkpoints" / "resnet20_cifar10.pth.tar")
    train, test = load_cifar10(npz, "train"), load_cifar10(npz, "test")
    x = train.tensors[0]
    # n_gradients only for the methods that use gradients (the others refuse it)
    uses_gradients = fp.defaults(method).n_gradients is not None
    extra = prune_kwargs({**({"n_gradients": n_gradients}
                             if n_gradients is not None and uses_gradients else {}),
                          **(kwargs or {})}, method)
    if "recalibrate_bn" in extra:  # given in --kwargs: one place only
        if recalibrate_bn:
            raise SystemExit("give recalibrate_bn in --kwargs or --recalibrate-bn, not both")
        recalibrate_bn = extra.pop("recalibrate_bn")
    units = [unit_seconds(model, *train.tensors)]  # measured before and after the run
    t = time.perf_counter()
    r = fp.prune(model.eval(), train.tensors, flops=flops, method=method, seed=seed,
                 sampling=sampling, progress=False, recalibrate_bn=recalibrate_bn, **extra)
    seconds = time.perf_counter() - t
    units.append(unit_seconds(model, *train.tensors))
    kept, dense = fp.count_macs(r.model, x[:1])  # folds the masks in a copy
    plain = plain_copy(r.model)
    weights = [lay.tensor for lay in fp.CostModel.from_model(plain, x[:1]).layers]
    nnz = sum(int(w.count_nonzero()) for w in weights) / sum(w.numel() for w in weights)
    return {
        "method": method + (f" ({label})" if label else "")
        + (" + BN recalibration" if recalibrate_bn else ""),
        "kwargs": kwargs or {},
        "flops_budget": flops, "seed": seed,
        "accuracy": accuracy(r.model, test.tensors),
        "flops_fraction": r.flops_fraction, "flops_recount": kept / dense,
        "nnz_fraction": r.nnz_fraction, "nnz_recount": nnz,
        "seconds": seconds, "unit_seconds": units, "units": seconds / (sum(units) / 2),
        "times": r.times, "peak_rss_mb": peak_rss_mb(),
        "ilp_gap": r.ilp_gap, "sampling": r.config.sampling, "stages": r.stages,
        "details": {k: v for k, v in r.details.items() if k != "candidates"},
        "config": r.config.to_dict(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.4, 0.3])
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--n-gradients", type=int, default=None,
                    help="default: the library's default for the method")
    ap.add_argument("--sampling", choices=["first", "random"], default="first")
    ap.add_argument("--recalibrate-bn", type=int, default=0, metavar="N",
                    help="re-estimate BatchNorm statistics on N samples after pruning "
                         "(rows labelled 'METHOD + BN recalibration')")
    ap.add_argument("--kwargs", type=json.loads, default=None,
                    help="further prune() keyword arguments as JSON")
    ap.add_argument("--label", default=None, help="tag for these rows' method")
    ap.add_argument("--append", action="store_true", help="add to the rows already in --out")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/oneshot_resnet20.json"))
    ap.add_argument("--single", nargs=3, metavar=("METHOD", "FLOPS", "SEED"),
                    help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.single:
        row = run_one(a.single[0], float(a.single[1]), int(a.single[2]), a.n_gradients,
                      a.sampling, a.recalibrate_bn, a.kwargs, a.label)
        print("RESULT " + json.dumps(row))
        return
    if not (SHARED / "checkpoints" / "resnet20_cifar10.pth.tar").exists():
        sys.exit(f"{SHARED} is absent: this benchmark needs the project's shared data")
    prov = provenance()
    before = previous(a.out) if a.append and a.out.exists() else None
    rows = before["rows"] if before else []
    earlier = before["commands"] if before else None
    earlier_prov = before["provenance"] if before else None
    for flops in a.budgets:
        for method in a.methods:
            for seed in a.seeds:
                extra = [] if a.n_gradients is None else ["--n-gradients", str(a.n_gradients)]
                extra += ["--recalibrate-bn", str(a.recalibrate_bn)]
                if a.kwargs:
                    extra += ["--kwargs", json.dumps(a.kwargs)]
                if a.label:
                    extra += ["--label", a.label]
                row = run_isolated(__file__, [*extra, "--sampling", a.sampling, "--single",
                                              method, str(flops), str(seed)])
                rows.append(row)
                print(f"{flops:.2f} {method:<10} acc {row['accuracy']:.4f} FLOPs "
                      f"{row['flops_fraction']:.4f} (recount {row['flops_recount']:.4f}) NNZ "
                      f"{row['nnz_fraction']:.4f} {row['seconds']:.1f}s "
                      f"({row['units']:.1f} units) "
                      f"{row['peak_rss_mb']:.0f} MiB", flush=True)
                save_rows(a.out, rows, earlier, prov, earlier_prov)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
