"""Per-sample gradients of recurrent and attention networks: the library's route against
``torch.func.vmap`` over PyTorch's default CPU kernels and one backward pass per sample.

PyTorch runs LSTM/GRU on the CPU as one oneDNN kernel and attention as a fused
scaled-dot-product kernel. vmap has no batching rule for the first, so it loops over the
samples (and warns "There is a performance drop"). The library takes its gradient rows with
attention on the math backend and recurrent layers unrolled into matrix products
(``falcon_prune.analysis.recurrent``). For each network the three routes compute the rows of the
same samples, interleaved, repeated; the table gives the median milliseconds per sample,
whether vmap fell back to its loop, and the largest difference from the per-sample
backward passes.

    python benchmarks/gradient_routes.py --out benchmarks/results/gradient_routes.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from isolated import provenance, write_results
from torch import nn
from torch.func import functional_call, grad, vmap


class Recurrent(nn.Module):
    """A 2-layer LSTM (or GRU) classifier over sequences of 32 steps of 32 features."""

    def __init__(self, kind=nn.LSTM):
        super().__init__()
        self.rnn = kind(32, 128, num_layers=2, batch_first=True)
        self.fc = nn.Linear(128, 10)

    def forward(self, x):
        return self.fc(self.rnn(x)[0][:, -1])


class Encoder(nn.Module):
    """A 2-layer transformer encoder classifier (d 128, 4 heads) over 32 tokens."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(32, 128)
        layer = nn.TransformerEncoderLayer(128, 4, 256, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.fc = nn.Linear(128, 10)

    def forward(self, x):
        return self.fc(self.enc(self.inp(x)).mean(1))


def routes(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """{route: () -> (n, p) rows} for the prunable weights of ``model``."""
    import falcon_prune as fp
    from falcon_prune.data.batches import Samples
    from falcon_prune.loss.gradients import gradient_matrix

    cm = fp.CostModel.from_model(model, x[:2])
    names = [lay.name for lay in cm.layers]
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0))

    def default_vmap():
        g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
        return torch.cat([g[k].reshape(len(x), -1) for k in names], 1)

    def per_sample():
        rows = []
        for i in range(len(x)):
            p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
            gs = torch.autograd.grad(loss(p, x[i], y[i]), [p[k] for k in names])
            rows.append(torch.cat([t.reshape(-1) for t in gs]))
        return torch.stack(rows)

    def library():
        return gradient_matrix(model, cm, Samples((x, y)), len(x), progress=False)

    return {"library": library, "vmap_default_kernels": default_vmap,
            "backward_per_sample": per_sample}


def measure(name: str, model: nn.Module, n: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    fns = routes(model.eval(), x, y)
    times = {k: [] for k in fns}
    rows, fell_back, failed = {}, {}, {}
    for _ in range(repeats):
        for k, fn in fns.items():  # interleaved: every route once per repeat
            if k in failed:
                continue
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                t = time.perf_counter()
                try:
                    rows[k] = fn()
                except RuntimeError as e:  # vmap cannot batch the kernel at all
                    failed[k] = str(e).splitlines()[0][:200]
                    continue
                times[k].append((time.perf_counter() - t) / n * 1e3)
            fell_back[k] = any("performance drop" in str(w.message) for w in caught)
    ref = rows["backward_per_sample"]
    out = {"network": name, "samples": n, "repeats": repeats, "p": int(ref.shape[1])}
    for k in fns:
        if k in failed:
            out[k] = {"error": failed[k]}
            print(f"{name:8s} {k:22s} fails: {failed[k]}", flush=True)
            continue
        out[k] = {"ms_per_sample": statistics.median(times[k]), "all_ms": times[k],
                  "vmap_loop_fallback": fell_back[k],
                  "max_abs_diff": float((rows[k] - ref).abs().max())}
        print(f"{name:8s} {k:22s} {out[k]['ms_per_sample']:7.2f} ms/sample  fallback "
              f"{fell_back[k]}  diff {out[k]['max_abs_diff']:.1e}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/gradient_routes.json"))
    a = ap.parse_args()
    prov = {**provenance(), "torch_threads": torch.get_num_threads()}
    torch.manual_seed(0)
    nets = {"lstm": Recurrent(nn.LSTM), "gru": Recurrent(nn.GRU), "encoder": Encoder()}
    rows = [measure(k, m, a.samples, a.repeats) for k, m in nets.items()]
    write_results(a.out, {"command": " ".join(["python", *sys.argv]), "rows": rows}, prov)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
