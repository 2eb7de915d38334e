"""The solver's two O(n^2 p) products, each formed two ways, timed side by side.

falcon++ spends most of its solver time in two products over the gradient matrix X
(n x p, read in the store's column chunks): the Gram matrix X X^T (the support solves and
the OBS saliency) and the squared column norms of L^-1 X (the inverse Hessian's diagonal,
L the Cholesky factor of X X^T + n lam I). The Gram is timed as a plain ``X @ X.T`` (the
library's earlier way) and as ``storage.self_gram`` forms it now (two diagonal blocks and
one off-diagonal block, the other mirrored); the diagonal as the library forms it (a
float32 triangular solve with L) and with L^-1 inverted once and its zero upper-right
block skipped (``lower_product_sq_norms`` below, measured and not taken). Rows computed
in bfloat16 hold bfloat16 values, and their Gram is also timed on the CPU's bfloat16 units
(``storage.bfloat16_products``: exact products, float32 sums) against float32 units on the
same rounded rows. On the shared
ResNet20's gradient rows (2 samples each), at each ``--rows``; interleaved, median of
``--repeats``, with the largest difference between the two ways.

    python benchmarks/solver_kernels.py --out benchmarks/results/solver_kernels.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from gradient_speed import interleaved_medians
from isolated import provenance, write_results
from saliency_vs_magnitude import gradient_rows

SHARED = Path(__file__).resolve().parents[2] / "shared"


def lower_product_sq_norms(T: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """The squared column norms of T X (c,) for T (n, n) lower triangular and X (n, c),
    from the product's two row blocks, its zero upper-right block skipped."""
    h = T.shape[0] // 2
    top = T[:h, :h] @ X[:h]
    bottom = T[h:, :h] @ X[:h]
    bottom += T[h:, h:] @ X[h:]
    return top.square().sum(0) + bottom.square().sum(0)


def kernels(X: torch.Tensor, ridge: float, repeats: int) -> dict:
    """Seconds of both ways of each product over every column chunk of X, and the largest
    relative difference of their results."""
    from falcon_prune.loss.storage import GradientStore, bfloat16_products, self_gram

    n = X.shape[0]
    store = GradientStore.from_tensor(X)
    chunks = [X[:, a:b] for a, b in store.ranges()]
    K = store.gram()
    K.diagonal().add_(ridge * n)
    L = torch.linalg.cholesky(K)
    L32 = L.float()
    L_inv = torch.linalg.solve_triangular(L, torch.eye(n, dtype=L.dtype), upper=False).float()
    rounded = [c.bfloat16().float() for c in chunks]  # rows as bfloat16 rows hold them

    def on_bfloat16_units() -> list[torch.Tensor]:
        with bfloat16_products(X.device):
            return [self_gram(c) for c in rounded]

    ways = {
        "gram: X @ X.T": lambda: [c @ c.T for c in chunks],
        "gram: self_gram": lambda: [self_gram(c) for c in chunks],
        "gram of bfloat16 values: float32 units": lambda: [self_gram(c) for c in rounded],
        "gram of bfloat16 values: bfloat16 units": on_bfloat16_units,
        "diagonal: triangular solve": lambda: [
            torch.linalg.solve_triangular(L32, c, upper=False).square().sum(0) for c in chunks],
        "diagonal: lower_product_sq_norms": lambda: [
            lower_product_sq_norms(L_inv, c) for c in chunks],
    }
    out = {k: torch.cat([t.reshape(-1) for t in fn()]) for k, fn in ways.items()}
    keys = list(ways)

    def rel(a: str, b: str) -> float:
        return float((out[a] - out[b]).abs().max() / out[a].abs().max())

    return {"n": n, "p": X.shape[1], "chunks": len(chunks),
            "seconds": interleaved_medians(ways, repeats),
            "max_rel_difference": {"gram": rel(keys[0], keys[1]),
                                   "gram of bfloat16 values": rel(keys[2], keys[3]),
                                   "diagonal": rel(keys[4], keys[5])}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[500, 1000])
    ap.add_argument("--ridge", type=float, default=1e-3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/solver_kernels.json"))
    a = ap.parse_args()
    if not (SHARED / "checkpoints" / "resnet20_cifar10.pth.tar").exists():
        raise SystemExit(f"{SHARED} is absent: this benchmark needs the project's shared data")
    from falcon_prune.data.datasets import load_cifar10
    from falcon_prune.models import load_checkpoint, resnet20

    model = load_checkpoint(resnet20(), SHARED / "checkpoints" / "resnet20_cifar10.pth.tar")
    x, y = load_cifar10(SHARED / "data" / "cifar10_subset.npz", "train").tensors
    rows = []
    for n in a.rows:
        X, _ = gradient_rows(model.eval(), x, y, n)
        rows.append(kernels(X, a.ridge, a.repeats))
        s = rows[-1]["seconds"]
        print(f"n={n}: " + ", ".join(f"{k} {v:.3f} s" for k, v in s.items()), flush=True)
    write_results(a.out, {"command": "python benchmarks/solver_kernels.py --rows "
                                     + " ".join(map(str, a.rows))
                                     + f" --ridge {a.ridge} --repeats {a.repeats}",
                          "threads": torch.get_num_threads(), "rows": rows}, provenance())
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
