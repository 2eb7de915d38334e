"""How much does falcon++'s OBS saliency change the selection, compared with magnitude?

On the shared CIFAR-10 ResNet20, dense and magnitude-pruned to 50 % and 30 % of its
weights, 1,000 gradient rows of 2 samples each are formed and, at the library's ridge,
the OBS saliency w_i^2 / [H^-1]_ii of every surviving weight is computed (the library's
``inverse_hessian_diagonal``). The weights kept when 80 % of the survivors are kept by the
OBS saliency and by magnitude are compared: the fraction that differs. Also the spread of
q_i = 1 - lam [H^-1]_ii (how far the diagonal is from 1 / lam). On the dense network it
also times the diagonal's big product as the library forms it (float32 triangular solve)
against an explicit L^-1 multiplied in bfloat16, interleaved, median of ``--repeats``.

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


def gradient_rows(model, x, y, rows: int):
    """X (rows, p): gradient rows of 2 samples each, and the flat weights w (p,)."""
    from falcon_prune import CostModel
    from falcon_prune.analysis.costs import flatten_weights
    from falcon_prune.data.batches import Samples
    from falcon_prune.loss.gradients import gradient_matrix

    cm = CostModel.from_model(model, x[:1])
    X = gradient_matrix(model, cm, Samples((x, y)), rows, 2, progress=False)
    return X, flatten_weights(cm).float()


def compare(X, w, keep: float, ridge: float) -> dict:
    """Fraction of the kept set that differs between OBS saliency and magnitude, and
    quantiles of q = 1 - lam [H^-1]_ii over the surviving weights."""
    from falcon_prune.loss.quadratic import QuadraticModel
    from falcon_prune.loss.saliency import inverse_hessian_diagonal

    alive = w != 0
    d = inverse_hessian_diagonal(QuadraticModel(X, w, ridge, 0.01))[alive]
    wa = w.double()[alive]
    k = int(keep * alive.sum())
    obs = set(torch.topk(wa ** 2 / d, k).indices.tolist())
    mag = set(torch.topk(wa ** 2, k).indices.tolist())
    q = 1 - ridge * d
    return {"alive": int(alive.sum()), "kept": k, "differ": 1 - len(obs & mag) / k,
            "q_quantiles": {str(p): float(q.quantile(p)) for p in (0.5, 0.9, 0.99)}}


def product_seconds(X, w, ridge: float, repeats: int) -> dict:
    """Seconds of the inverse-Hessian diagonal: the library's (float32 triangular solve of
    the Cholesky factor, Gram cached) against L^-1 X with L^-1 formed once and multiplied
    in bfloat16; and the bfloat16 diagonal's largest relative error."""
    from gradient_speed import interleaved_medians

    from falcon_prune.loss.quadratic import QuadraticModel
    from falcon_prune.loss.saliency import inverse_hessian_diagonal

    qm = QuadraticModel(X, w, ridge, 0.01)
    n = X.shape[0]
    K = qm.support_gram(torch.ones(X.shape[1], dtype=torch.bool)).clone()
    K.diagonal().add_(ridge * n)
    L = torch.linalg.cholesky(K)
    Li = torch.linalg.solve_triangular(L, torch.eye(n, dtype=L.dtype), upper=False)
    Li = Li.to(torch.bfloat16)

    def bf16() -> torch.Tensor:
        out = torch.empty(X.shape[1], dtype=torch.float64)
        for a in range(0, X.shape[1], 1 << 15):
            Xc = X[:, a:a + (1 << 15)]
            q = (Li @ Xc.to(torch.bfloat16)).float().square().sum(0).double()
            lower = 1 / (ridge + Xc.square().sum(0).double() / n)
            out[a:a + (1 << 15)] = torch.maximum((1 - q) / ridge, lower)
        return out

    ref = inverse_hessian_diagonal(qm)
    secs = interleaved_medians({"float32 solve": lambda: inverse_hessian_diagonal(qm),
                                "bfloat16 product": bf16}, repeats)
    return {"seconds": secs, "bf16_max_rel_error": float(((bf16() - ref) / ref).abs().max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--keep", type=float, default=0.8)
    ap.add_argument("--ridge", type=float, default=1e-3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path,
                    default=Path("benchmarks/results/saliency_vs_magnitude.json"))
    a = ap.parse_args()
    if not (SHARED / "checkpoints" / "resnet20_cifar10.pth.tar").exists():
        raise SystemExit(f"{SHARED} is absent: this benchmark needs the project's shared data")
    from falcon_prune.data.datasets import load_cifar10
    from falcon_prune.models import load_checkpoint, resnet20

    base = load_checkpoint(resnet20(), SHARED / "checkpoints" / "resnet20_cifar10.pth.tar").eval()
    x, y = load_cifar10(SHARED / "data" / "cifar10_subset.npz", "train").tensors
    rows = []
    for kept in (1.0, 0.5, 0.3):
        X, w = gradient_rows(magnitude_pruned(base, kept), x, y, a.rows)
        row = {"weights_kept": kept, **compare(X, w, a.keep, a.ridge)}
        if kept == 1.0:
            row["diagonal_product"] = product_seconds(X, w, a.ridge, a.repeats)
            print(row["diagonal_product"], flush=True)
        rows.append(row)
        print(f"weights kept {kept}: {100 * row['differ']:.4f} % of the kept set differs; "
              f"q median {row['q_quantiles']['0.5']:.3f}, p99 {row['q_quantiles']['0.99']:.3f}",
              flush=True)
    write_results(a.out, {"command": f"python benchmarks/saliency_vs_magnitude.py --rows "
                                     f"{a.rows} --keep {a.keep} --ridge {a.ridge} "
                                     f"--repeats {a.repeats}",
                          "rows": rows}, provenance())


if __name__ == "__main__":
    main()
