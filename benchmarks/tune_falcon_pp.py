"""Choose FALCON++ settings on a validation split carved from the CIFAR-10 training images.

The 4,660 shared training images are split once (seeded): ``--prune-images`` of them
(default 3,000) are the only data ``prune`` sees (gradients and its own held-out samples
are drawn from them), the other 1,660 are the validation split on which every candidate
setting is scored (accuracy and loss of the pruned, not retrained, network). The 846 test
images are never read. Each (setting, budget, seed) runs in its own process.

    python benchmarks/tune_falcon_pp.py --budgets 0.4 0.3 0.2 --seeds 0 \
        --out benchmarks/results/tune_falcon_pp.json

A setting is a JSON object of falcon++ settings (fields of ``falcon_prune.PruneConfig``:
``n_gradients``, ``samples_per_gradient``, ``n_validation``, ``ridge``, ``alpha``,
``resample``, ``revive``, ``recalibrate_bn``, ...), of its schedule (``schedule``, ``stages``,
``start``: the first stage's kept fraction, ``min_step``: one ``falcon_prune.Schedule``) and
of :class:`falcon_prune.SolverOptions` (``ridges``, ``max_iter``, ``cost_exponents``,
``step``, ``step_scale``, ``rounds``, ``active_factor``, ``saliencies``, ``obs_steps``: one
``solver`` on falcon++'s defaults), mapped onto ``prune`` arguments by
``isolated.prune_kwargs``. Settings not named keep the library's current falcon++ defaults.
``--settings`` takes a JSON file with a list of them (default: the grid below; the grids of
the tuning rounds are in benchmarks/tune_grids/, those that no longer run in
benchmarks/archive/tune_grids/). ``--check`` only validates every setting of the grid
(``falcon_prune.config.resolve``, nothing is pruned). Each row records the settings the run
actually used (``config``); the file starts with the provenance of the run.

``--ft-epochs N`` also scores every pruned network after N epochs of fine-tuning on the
prune images (``structured_speed.fine_tune``, its benchmark's recipe), for settings chosen
on accuracy after fine-tuning; ``--torch-pruning L1 L2 ...`` scores those Torch-Pruning
criteria (global, ratio bisected to each budget) on the same split as a reference:

    python benchmarks/tune_falcon_pp.py --settings benchmarks/tune_grids/channels_ft30.json \
        --budgets 0.3 --seeds 0 1 2 --ft-epochs 3 --torch-pruning L1 L2 \
        --out benchmarks/results/tune_channels_ft30.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from isolated import provenance, prune_kwargs, run_isolated, save_rows, unit_seconds

SHARED = Path(__file__).resolve().parents[2] / "shared"

GRID = [
    {},  # the library's defaults
    {"schedule": "linear"},
    {"schedule": "exponential"},
    {"stages": 8, "n_gradients": 500},
    {"stages": 8, "n_gradients": 500, "schedule": "exponential"},
    {"stages": 10, "n_gradients": 500, "schedule": "exponential"},
    {"stages": 10, "n_gradients": 500, "schedule": "linear"},
]


def setting_kwargs(setting: dict) -> dict:
    """The ``prune`` keyword arguments of a setting (seeded random samples of the split
    unless the setting says otherwise)."""
    return {"sampling": "random", **prune_kwargs(setting, "falcon++")}


def check(grid: list[dict]) -> list[tuple[dict, str | None]]:
    """(setting, None) for each setting falcon++ accepts, (setting, why) for the others;
    validated by ``falcon_prune.config.resolve`` without pruning anything."""
    from falcon_prune.errors import FalconPruneError
    from falcon_prune.settings import resolve

    out = []
    for setting in grid:
        try:
            resolve("falcon++", None, {**setting_kwargs(setting), "seed": 0})
            out.append((setting, None))
        except (FalconPruneError, ValueError, TypeError) as e:
            out.append((setting, f"{type(e).__name__}: {e}"))
    return out


def split_data(prune_images: int):
    """The ResNet20 checkpoint, the prune images (x, y) and the validation images (x, y)."""
    import torch

    from falcon_prune.data.datasets import load_cifar10
    from falcon_prune.models import load_checkpoint, resnet20

    npz = SHARED / "data" / "cifar10_subset.npz"
    model = load_checkpoint(resnet20(), SHARED / "checkpoints" / "resnet20_cifar10.pth.tar")
    x, y = load_cifar10(npz, "train").tensors
    split = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
    tr, va = split[:prune_images], split[prune_images:]
    return model, (x[tr], y[tr]), (x[va], y[va])


def fine_tuned_accuracy(model, train, val, epochs: int, seed: int) -> float:
    """Validation accuracy of a copy of ``model`` after ``structured_speed.fine_tune``
    (``epochs`` epochs on the prune images, learning rate 0.01: its benchmark's recipe)."""
    import copy

    from structured_speed import fine_tune

    import falcon_prune as fp

    model = copy.deepcopy(model)
    fine_tune(model, train, epochs, 0.01, seed)
    return fp.evaluate(model.eval(), val).metric


def run_one(setting: dict, flops: float, seed: int, prune_images: int,
            ft_epochs: int = 0) -> dict:
    """One falcon++ run of ``setting`` at ``flops`` and ``seed`` on the split, scored on
    the validation images (also after ``ft_epochs`` epochs of fine-tuning when > 0)."""
    import falcon_prune as fp

    model, (xt, yt), val = split_data(prune_images)
    # options not named keep falcon++'s defaults (round 2 and earlier used SolverOptions'
    # own defaults for them, e.g. max_iter=30, whenever a setting named any option)
    kw = setting_kwargs(setting)
    units = [unit_seconds(model, xt, yt)]  # measured before and after the run
    t = time.perf_counter()
    r = fp.prune(model.eval(), (xt, yt), flops=flops, method="falcon++", seed=seed,
                 progress=False, **kw)
    seconds = time.perf_counter() - t
    units.append(unit_seconds(model, xt, yt))
    ev = fp.evaluate(r.model, val)
    ft = {"val_accuracy_finetuned": fine_tuned_accuracy(r.model, (xt, yt), val, ft_epochs, seed)
          } if ft_epochs else {}
    return {
        "setting": setting, "flops_budget": flops, "seed": seed,
        "val_accuracy": ev.metric, "val_loss": ev.loss, **ft,
        "flops_fraction": r.flops_fraction, "seconds": seconds,
        "unit_seconds": units, "units": seconds / (sum(units) / 2), "times": r.times,
        "stages": [{k: v for k, v in row.items()
                    if k in ("stage", "held_out_loss", "saliency", "cost_exponent", "ridge",
                             "seconds")} for row in r.stages],
        "config": r.config.to_dict(),
    }


def torch_pruning_row(name: str, flops: float, seed: int, prune_images: int,
                      ft_epochs: int) -> dict:
    """Torch-Pruning's criterion ``name`` (global MetaPruner, its ratio bisected until the
    MACs meet ``flops``; ``structured_speed.tp_at_budget``) on the same split: validation
    accuracy after BatchNorm re-estimation on 1,000 prune images, and after fine-tuning
    (``structured_speed.accuracies``, the benchmark's own scoring, on the split)."""
    from structured_speed import accuracies, macs_params, tp_at_budget

    model, train, val = split_data(prune_images)
    dense = macs_params(model.eval(), train[0])[0]
    pruned, ratio = tp_at_budget(model, name, flops, True, train, dense)
    acc = accuracies(pruned, train, val, ft_epochs, 0.01, seed)
    row = {"setting": {"torch_pruning": name}, "flops_budget": flops, "seed": seed,
           "pruning_ratio": ratio, "flops_fraction": macs_params(pruned, train[0])[0] / dense,
           "val_accuracy": acc["accuracy_bn"]}
    if ft_epochs:
        row["val_accuracy_finetuned"] = acc["accuracy_finetuned"]
    return row


def summary(rows: list, budgets: list[float]) -> None:
    """Median validation accuracy (and after fine-tuning, when measured) per setting and
    budget."""
    print("\nmedian validation accuracy per setting and budget "
          "(in parentheses: after fine-tuning):")
    for setting in {json.dumps(r["setting"]): r["setting"] for r in rows}.values():
        cells = []
        for flops in budgets:
            mine = [r for r in rows if r["setting"] == setting and r["flops_budget"] == flops]
            cell = f"{flops:.2f}: {statistics.median(r['val_accuracy'] for r in mine):.4f}"
            if all("val_accuracy_finetuned" in r for r in mine):
                ft = statistics.median(r["val_accuracy_finetuned"] for r in mine)
                cell += f" ({ft:.4f})"
            cells.append(cell)
        print(f"{json.dumps(setting):<70} " + "  ".join(cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.4, 0.3, 0.2])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--prune-images", type=int, default=3000)
    ap.add_argument("--settings", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/tune_falcon_pp.json"))
    ap.add_argument("--ft-epochs", type=int, default=0,
                    help="also score each pruned network after this many epochs of "
                         "fine-tuning on the prune images (structured_speed's recipe)")
    ap.add_argument("--torch-pruning", nargs="*", default=[],
                    choices=["L1", "L2", "Taylor", "Hessian"],
                    help="also score these Torch-Pruning criteria (L1, L2, Taylor, Hessian; "
                         "global) on the same split, budgets and seeds")
    ap.add_argument("--check", action="store_true",
                    help="only check that every setting of the grid can run; prune nothing")
    ap.add_argument("--single", nargs=3, metavar=("SETTING", "FLOPS", "SEED"),
                    help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.single:
        row = run_one(json.loads(a.single[0]), float(a.single[1]), int(a.single[2]),
                      a.prune_images, a.ft_epochs)
        print("RESULT " + json.dumps(row))
        return
    grid = json.loads(a.settings.read_text()) if a.settings else GRID
    if a.check:
        bad = 0
        for setting, why in check(grid):
            bad += why is not None
            print(f"{json.dumps(setting):<70} {'ok' if why is None else why}")
        sys.exit(f"{bad} of {len(grid)} settings cannot run" if bad else None)
    if not (SHARED / "checkpoints" / "resnet20_cifar10.pth.tar").exists():
        sys.exit(f"{SHARED} is absent: this benchmark needs the project's shared data")
    prov = provenance()
    rows = []
    for name in a.torch_pruning:
        for flops in a.budgets:
            for seed in a.seeds:
                rows.append(torch_pruning_row(name, flops, seed, a.prune_images, a.ft_epochs))
                report(rows[-1])
                save_rows(a.out, rows, prov=prov)
    for setting in grid:
        for flops in a.budgets:
            for seed in a.seeds:
                rows.append(run_isolated(__file__, [
                    "--prune-images", str(a.prune_images), "--ft-epochs", str(a.ft_epochs),
                    "--single", json.dumps(setting), str(flops), str(seed)]))
                report(rows[-1])
                save_rows(a.out, rows, prov=prov)
    summary(rows, a.budgets)


def report(row: dict) -> None:
    ft = (f" fine-tuned {row['val_accuracy_finetuned']:.4f}"
          if "val_accuracy_finetuned" in row else "")
    took = f" {row['seconds']:.1f}s ({row['units']:.1f} units)" if "units" in row else ""
    print(f"{json.dumps(row['setting']):<70} {row['flops_budget']:.2f} seed {row['seed']} "
          f"val acc {row['val_accuracy']:.4f}{ft}{took}", flush=True)


if __name__ == "__main__":
    main()
