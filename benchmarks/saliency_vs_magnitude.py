"""How much does falcon++'s OBS saliency change the selection, compared with magnitude?

On the shared CIFAR-10 ResNet20, dense and magnitude-pruned to 50 % and 30 % of its
weights, 1,000 gradient rows of 2 samples each are formed and, at the library's ridge,
the OBS saliency w_i^2 / [H^-1]_ii of every surviving weight is computed (the library's
``inverse_hessian_diagonal``). The weights kept when 80 % of the survivors are kept by the
OBS saliency and by magnitude are compared: the fraction that differs. Also the spread of
q_i = 1 - lam [H^-1]_ii (how far the diagonal is from 1 / lam).

    python benchmarks/saliency_vs_magnitude.py --out benchmarks/results/saliency_vs_magnitude.json
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from isolated import provenance, write_results

SHARED = Path(__file__).resolve().parents[2] / "shared"


def magnitude_pruned(model, kept: float):
    """A copy of ``model`` whose Conv2d/Linear weights keep the largest ``kept`` fraction
    by magnitude (one global threshold)."""
    model = copy.deepcopy(model)
    ws = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    if kept < 1:
        mags = torch.cat([w.detach().abs().flatten() for w in ws])
        thr = mags.kthvalue(int((1 - kept) * len(mags))).values
        with torch.no_grad():
            for w in ws:
                w.mul_((w.abs() > thr).to(w.dtype))
    return model


def compare(model, x, y, rows: int, keep: float, ridge: float) -> dict:
    """Fraction of the kept set that differs between OBS saliency and magnitude, and
    quantiles of q = 1 - lam [H^-1]_ii over the surviving weights."""
    from falcon_prune import CostModel
    from falcon_prune.batches import Samples
    from falcon_prune.engine import flatten_weights
    from falcon_prune.fisher import gradient_matrix
    from falcon_prune.quadratic import QuadraticModel
    from falcon_prune.solvers import inverse_hessian_diagonal

    cm = CostModel.from_model(model, x[:1])
    X = gradient_matrix(model, cm, Samples((x, y)), rows, 2, progress=False)
    w = flatten_weights(cm).float()
    alive = w != 0
    d = inverse_hessian_diagonal(QuadraticModel(X, w, ridge, 0.01))[alive]
    wa = w.double()[alive]
    k = int(keep * alive.sum())
    obs = set(torch.topk(wa ** 2 / d, k).indices.tolist())
    mag = set(torch.topk(wa ** 2, k).indices.tolist())
    q = 1 - ridge * d
    return {"alive": int(alive.sum()), "kept": k, "differ": 1 - len(obs & mag) / k,
            "q_quantiles": {str(p): float(q.quantile(p)) for p in (0.5, 0.9, 0.99)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--keep", type=float, default=0.8)
    ap.add_argument("--ridge", type=float, default=1e-3)
    ap.add_argument("--out", type=Path,
                    default=Path("benchmarks/results/saliency_vs_magnitude.json"))
    a = ap.parse_args()
    if not (SHARED / "checkpoints" / "resnet20_cifar10.pth.tar").exists():
        raise SystemExit(f"{SHARED} is absent: this benchmark needs the project's shared data")
    from falcon_prune.data import load_cifar10
    from falcon_prune.models import load_checkpoint, resnet20

    base = load_checkpoint(resnet20(), SHARED / "checkpoints" / "resnet20_cifar10.pth.tar").eval()
    x, y = load_cifar10(SHARED / "data" / "cifar10_subset.npz", "train").tensors
    rows = []
    for kept in (1.0, 0.5, 0.3):
        row = {"weights_kept": kept, **compare(magnitude_pruned(base, kept), x, y, a.rows,
                                               a.keep, a.ridge)}
        rows.append(row)
        print(f"weights kept {kept}: {100 * row['differ']:.4f} % of the kept set differs; "
              f"q median {row['q_quantiles']['0.5']:.3f}, p99 {row['q_quantiles']['0.99']:.3f}",
              flush=True)
    write_results(a.out, {"command": f"python benchmarks/saliency_vs_magnitude.py --rows "
                                     f"{a.rows} --keep {a.keep} --ridge {a.ridge}",
                          "rows": rows}, provenance())


if __name__ == "__main__":
    main()
