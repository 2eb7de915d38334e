"""Per-sample gradients of a CNN: ``torch.func.vmap`` (the library's route) against the
hook route of BackPACK and Opacus, and against one plain batched backward pass (a unit).

The hook route runs one batched forward and backward pass, keeps every prunable layer's
input and output gradient, and forms each sample's weight gradient from them: for a
convolution, the output gradient (C_out x L) times the unfolded input (L x C_in k^2)
(``F.unfold``), for a Linear layer the outer product summed over positions. It is written
here only to be measured; the library takes its rows with vmap.

ResNet20 on 64 of the shared CIFAR-10 training images (../shared), median of 7 repeats
each, interleaved; milliseconds per sample and the largest difference from vmap's rows.
``--precision bfloat16`` runs every route in bfloat16 (the library's
``gradient_precision="bfloat16"`` for vmap; a bfloat16 copy of the model for the others)
and reports the difference from float32 vmap rows relative to their norm.

    python benchmarks/conv_gradient_routes.py --out benchmarks/results/conv_gradient_routes.json
    python benchmarks/conv_gradient_routes.py --precision bfloat16 \
        --out benchmarks/results/conv_gradient_routes_bf16.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from isolated import provenance, write_results
from torch import nn

SHARED = Path(__file__).resolve().parents[2] / "shared"


def hook_rows(model: nn.Module, modules: list[nn.Module], x, y) -> torch.Tensor:
    """(N, p) per-sample gradients of the cross-entropy w.r.t. the weights of ``modules``
    (Conv2d with groups=1 or Linear), from one batched forward and backward pass."""
    saved: dict[int, list] = {}

    def keep(k):
        def fwd(module, inp, out):
            saved[k] = [inp[0].detach(), None]
            out.register_hook(lambda g: saved[k].__setitem__(1, g))
        return fwd

    handles = [m.register_forward_hook(keep(k)) for k, m in enumerate(modules)]
    first = modules[0].weight
    try:
        with torch.enable_grad():
            first.requires_grad_(True)
            loss = F.cross_entropy(model(x), y, reduction="sum")
            torch.autograd.grad(loss, [first])  # the hooks see every output gradient
    finally:
        for h in handles:
            h.remove()
    n, rows = x.shape[0], []
    for k, m in enumerate(modules):
        a, g = saved[k]
        if isinstance(m, nn.Conv2d):
            u = F.unfold(a, m.kernel_size, m.dilation, m.padding, m.stride)  # (N, C k^2, L)
            rows.append(torch.bmm(g.reshape(n, g.shape[1], -1), u.transpose(1, 2)).reshape(n, -1))
        else:
            rows.append(torch.bmm(g.reshape(n, -1, g.shape[-1]).transpose(1, 2),
                                  a.reshape(n, -1, a.shape[-1])).reshape(n, -1))
    return torch.cat(rows, 1)


def main() -> None:
    import falcon_prune as fp
    from falcon_prune.analysis.costs import CostModel
    from falcon_prune.data.batches import Samples
    from falcon_prune.data.datasets import load_cifar10
    from falcon_prune.models import load_checkpoint, resnet20

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--precision", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--out", type=Path,
                    default=Path("benchmarks/results/conv_gradient_routes.json"))
    a = ap.parse_args()
    ckpt = SHARED / "checkpoints" / "resnet20_cifar10.pth.tar"
    if not ckpt.exists():
        sys.exit(f"{ckpt} is absent: this benchmark needs the project's ../shared data")
    prov = provenance()
    model = load_checkpoint(resnet20(), ckpt).eval()
    x, y = load_cifar10(SHARED / "data" / "cifar10_subset.npz", "train").tensors
    x, y = x[:a.samples], y[:a.samples]
    cm = CostModel.from_model(model, x[:1])
    low = torch.bfloat16 if a.precision == "bfloat16" else None
    # the hook and plain routes run on a copy in the precision asked for
    run_model = model if low is None else copy.deepcopy(model).to(low)
    xr = x if low is None else x.to(low)
    modules = [run_model.get_submodule(lay.name.rpartition(".")[0]) for lay in cm.layers]
    params = [p for p in run_model.parameters()]

    def plain():
        loss = F.cross_entropy(run_model(xr), y)
        return torch.autograd.grad(loss, params)

    runs = {"vmap": lambda: fp.gradient_matrix(model, cm, Samples((x, y)), a.samples,
                                                precision=low, progress=False),
            "hooks": lambda: hook_rows(run_model, modules, xr, y),
            "plain batched backward": plain}
    ref = fp.gradient_matrix(model, cm, Samples((x, y)), a.samples, progress=False)
    rows = {k: runs[k]().float() for k in ("vmap", "hooks")}
    diff = float((rows["hooks"] - rows["vmap"]).abs().max())
    rel = {k: float((r - ref).norm() / ref.norm()) for k, r in rows.items()}
    times: dict = {k: [] for k in runs}
    for _ in range(a.repeats):
        for k, run in runs.items():
            t = time.perf_counter()
            run()
            times[k].append(time.perf_counter() - t)
    ms = {k: 1000 * statistics.median(v) / a.samples for k, v in times.items()}
    for k, v in ms.items():
        print(f"{k:<32} {v:.3f} ms per sample")
    print(f"largest difference hooks - vmap: {diff:.2e}; relative to float32 rows: {rel}")
    write_results(a.out, {"command": " ".join(["python", *sys.argv]),
                          "threads": torch.get_num_threads(), "samples": a.samples,
                          "precision": a.precision, "ms_per_sample": ms,
                          "max_abs_difference_hooks_vmap": diff,
                          "relative_difference_from_float32_vmap": rel}, prov)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
