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
    from falcon_prune.config import resolve
    from falcon_prune.errors import FalconPruneError

    out = []
    for setting in grid:
        try:
            resolve("falcon++", None, {**setting_kwargs(setting), "seed": 0})
            out.append((setting, None))
        except (FalconPruneError, ValueError, TypeError) as e:
            out.append((setting, f"{type(e).__name__}: {e}"))
    return out


def run_one(setting: dict, flops: float, seed: int, prune_images: int) -> dict:
    import torch

    import falcon_prune as fp
    from falcon_prune.data import load_cifar10
    from falcon_prune.models import load_checkpoint, resnet20

    npz = SHARED / "data" / "cifar10_subset.npz"
    model = load_checkpoint(resnet20(), SHARED / "checkpoints" / "resnet20_cifar10.pth.tar")
    x, y = load_cifar10(npz, "train").tensors
    split = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
    tr, va = split[:prune_images], split[prune_images:]
    # options not named keep falcon++'s defaults (round 2 and earlier used SolverOptions'
    # own defaults for them, e.g. max_iter=30, whenever a setting named any option)
    kw = setting_kwargs(setting)
    units = [unit_seconds(model, x[tr], y[tr])]  # measured before and after the run
    t = time.perf_counter()
    r = fp.prune(model.eval(), (x[tr], y[tr]), flops=flops, method="falcon++", seed=seed,
                 progress=False, **kw)
    seconds = time.perf_counter() - t
    units.append(unit_seconds(model, x[tr], y[tr]))
    ev = fp.evaluate(r.model, (x[va], y[va]))
    return {
        "setting": setting, "flops_budget": flops, "seed": seed,
        "val_accuracy": ev.metric, "val_loss": ev.loss,
        "flops_fraction": r.flops_fraction, "seconds": seconds,
        "unit_seconds": units, "units": seconds / (sum(units) / 2), "times": r.times,
        "stages": [{k: v for k, v in row.items()
                    if k in ("stage", "held_out_loss", "saliency", "cost_exponent", "ridge",
                             "seconds")} for row in r.stages],
        "config": r.config.to_dict(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.4, 0.3, 0.2])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--prune-images", type=int, default=3000)
    ap.add_argument("--settings", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/tune_falcon_pp.json"))
    ap.add_argument("--check", action="store_true",
                    help="only check that every setting of the grid can run; prune nothing")
    ap.add_argument("--single", nargs=3, metavar=("SETTING", "FLOPS", "SEED"),
                    help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.single:
        row = run_one(json.loads(a.single[0]), float(a.single[1]), int(a.single[2]),
                      a.prune_images)
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
    for setting in grid:
        for flops in a.budgets:
            for seed in a.seeds:
                row = run_isolated(__file__, ["--prune-images", str(a.prune_images),
                                              "--single", json.dumps(setting), str(flops),
                                              str(seed)])
                rows.append(row)
                print(f"{json.dumps(setting):<70} {flops:.2f} seed {seed} val acc "
                      f"{row['val_accuracy']:.4f} loss {row['val_loss']:.4f} "
                      f"{row['seconds']:.1f}s ({row['units']:.1f} units)", flush=True)
                save_rows(a.out, rows, prov=prov)
    print("\nmedian validation accuracy per setting and budget:")
    for setting in grid:
        cells = []
        for flops in a.budgets:
            accs = [r["val_accuracy"] for r in rows
                    if r["setting"] == setting and r["flops_budget"] == flops]
            cells.append(f"{flops:.2f}: {statistics.median(accs):.4f}")
        print(f"{json.dumps(setting):<70} " + "  ".join(cells))


if __name__ == "__main__":
    main()
