"""Structured pruning of the shared CIFAR-10 ResNet20: accuracy against Torch-Pruning's own
criteria at equal FLOPs, and measured latency, side by side in one process.

Per FLOP budget (``--budgets``, fractions of the dense MACs kept):

- ours: ``prune(structure="channels", method=--method)`` with BatchNorm re-estimation on
  1,000 training images (``recalibrate_bn=1000``; its held-out choices see the same
  re-estimation);
- Torch-Pruning 1.x's ``MetaPruner`` with its criteria: L1 and L2 group magnitude, Taylor
  and Hessian (OBD), each with global and with per-layer (uniform) pruning; the pruning
  ratio is searched by bisection until the recounted MACs meet the budget; the output layer
  is kept whole, as for ours;
- every network, ours and theirs: recounted MACs and parameters, accuracy on the 846 shared
  test images without and with BatchNorm re-estimation on the same 1,000 training images,
  and after the same short fine-tuning (``--ft-epochs`` epochs of SGD, momentum 0.9, weight
  decay 5e-4, batch 128, cosine LR from ``--ft-lr``, seeded, no augmentation) from the
  re-estimated network;
- CPU latency of the dense network and of ours at batch 1 and 64, in torch eager mode and
  in ONNX Runtime: one process, the networks measured in turn inside every repeat
  (interleaved), median of ``--repeats``; ``torch.get_num_threads()`` threads.

Also: an unstructured network at 30 % of the FLOPs (``structure="weights"``, the same
shapes with zeros), and MobileNetV1 and ResNet50 at 224 x 224 (seeded initial weights,
latency only, group magnitude pruning at each budget).

    python benchmarks/structured_speed.py --out benchmarks/results/structured_speed.json

``--tp-criteria L1 L2`` compares with those criteria only; ``--accuracy-only`` keeps the
ResNet20 accuracy rows (no latency, no unstructured or ImageNet-size network), for runs
over several seeds.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from isolated import provenance, write_results

SHARED = Path(__file__).resolve().parents[2] / "shared"


def data():
    from falcon_prune.data.datasets import load_cifar10

    npz = SHARED / "data" / "cifar10_subset.npz"
    return load_cifar10(npz, "train").tensors, load_cifar10(npz, "test").tensors


def resnet20():
    from falcon_prune.models import load_checkpoint, resnet20

    return load_checkpoint(resnet20(), SHARED / "checkpoints" / "resnet20_cifar10.pth.tar").eval()


def shared_resnet20() -> tuple[dict, tuple, tuple, torch.nn.Module, tuple[float, int]]:
    """What a ResNet20 benchmark starts from: (the run's provenance with torch's threads,
    the shared training and test tensors, the shared ResNet20, its dense (MACs per sample,
    parameters)); exits with a message when the project's shared data is absent."""
    if not (SHARED / "checkpoints" / "resnet20_cifar10.pth.tar").exists():
        sys.exit(f"{SHARED} is absent: this benchmark needs the project's shared data")
    prov = {**provenance(), "torch_threads": torch.get_num_threads()}
    train, test = data()
    base = resnet20()
    return prov, train, test, base, macs_params(base, train[0])


def macs_params(model, x) -> tuple[float, int]:
    """Dense MACs per sample of the network's Conv/Linear layers (torch.utils.flop_counter)
    and its parameter count."""
    import falcon_prune as fp

    _, dense = fp.count_macs(model, x[:1])
    return dense, sum(p.numel() for p in model.parameters())


# -- Torch-Pruning ---------------------------------------------------------------------------
def tp_criteria():
    import torch_pruning as tp

    imp = tp.importance
    return {"L1": lambda: imp.GroupMagnitudeImportance(p=1),
            "L2": lambda: imp.GroupMagnitudeImportance(p=2),
            "Taylor": lambda: imp.GroupTaylorImportance(),
            "Hessian": lambda: imp.GroupHessianImportance()}


def _tp_prune(base, name: str, ratio: float, global_pruning: bool, train) -> torch.nn.Module:
    """One Torch-Pruning MetaPruner step of ``ratio`` with criterion ``name``; the
    gradient-based criteria see 128 training images (Taylor: the batch gradient; Hessian:
    per-sample gradients, as Torch-Pruning's examples accumulate them)."""
    import torch_pruning as tp

    model = copy.deepcopy(base)
    imp = tp_criteria()[name]()
    x, y = train[0][:128], train[1][:128]
    pruner = tp.pruner.MetaPruner(model, x[:1], importance=imp, pruning_ratio=ratio,
                                  ignored_layers=[model.fc], global_pruning=global_pruning)
    model.zero_grad()
    if name == "Taylor":
        torch.nn.functional.cross_entropy(model(x), y).backward()
    elif name == "Hessian":
        imp.zero_grad()
        for i in range(len(x)):
            model.zero_grad()
            torch.nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
            imp.accumulate_grad(model)
    pruner.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


def tp_at_budget(base, name: str, flops: float, global_pruning: bool, train, dense_macs):
    """The Torch-Pruning network whose recounted MACs meet the budget, by bisection on its
    pruning ratio (14 steps); returns it and the ratio."""
    lo, hi, best = 0.0, 0.99, None
    for _ in range(14):
        mid = (lo + hi) / 2
        model = _tp_prune(base, name, mid, global_pruning, train)
        if macs_params(model, train[0])[0] <= flops * dense_macs * (1 + 1e-9):
            hi, best = mid, model
        else:
            lo = mid
    return (best if best is not None else _tp_prune(base, name, hi, global_pruning, train)), hi


# -- accuracy --------------------------------------------------------------------------------
def accuracies(model, train, test, ft_epochs: int, ft_lr: float, seed: int) -> dict:
    """Test accuracy as given, after BatchNorm re-estimation on the first 1,000 training
    images, and after fine-tuning from there (the recipe in the module doc)."""
    import falcon_prune as fp

    model = copy.deepcopy(model).eval()
    out = {"accuracy_oneshot": fp.evaluate(model, test).metric}
    fp.recalibrate_batchnorm(model, train[0][:1000])
    out["accuracy_bn"] = fp.evaluate(model, test).metric
    if ft_epochs:
        fine_tune(model, train, ft_epochs, ft_lr, seed)
        out["accuracy_finetuned"] = fp.evaluate(model.eval(), test).metric
    return out


def fine_tune(model, train, epochs: int, lr: float, seed: int) -> None:
    """SGD with momentum 0.9, weight decay 5e-4, batch 128, cosine LR over ``epochs``."""
    x, y = train
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    steps = epochs * math.ceil(len(x) / 128)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    g = torch.Generator().manual_seed(seed)
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=g)
            for a in range(0, len(x), 128):
                idx = perm[a:a + 128]
                loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    model.eval()


# -- latency ---------------------------------------------------------------------------------
def onnx_session(model, x):
    """An ONNX Runtime session of ``model`` exported with a dynamic batch (None when the
    onnx extras are missing); its threads do not spin between runs, so that they do not
    steal the CPU from the next measurement."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    path = Path(tempfile.mkdtemp()) / "model.onnx"
    torch.onnx.export(model, (x[:1],), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, dynamo=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _timer(run, x, calls: int) -> float:
    t = time.perf_counter()
    for _ in range(calls):
        run(x)
    return (time.perf_counter() - t) / calls


def latencies(models: dict, shape: tuple, batches: tuple[int, ...], repeats: int) -> dict:
    """{name: {"eager_b1": seconds, "ort_b1": ..., ...}}: per engine and batch, every
    network measured in turn inside each of ``repeats`` repeats (interleaved, one
    process), median of the repeats; a repeat times enough calls to last about 20 ms."""
    sessions = {k: onnx_session(m, torch.randn(1, *shape)) for k, m in models.items()}
    engines = {"eager": {k: m for k, m in models.items()},
               "ort": {k: (lambda x, s=s: s.run(None, {"x": x.numpy()}))
                       for k, s in sessions.items() if s is not None}}
    out: dict = {k: {} for k in models}
    with torch.inference_mode():
        for b in batches:
            x = torch.randn(b, *shape)
            for engine, runs in engines.items():
                seconds = interleaved({k: (run, x) for k, run in runs.items()}, repeats)
                for k, s in seconds.items():
                    out[k][f"{engine}_b{b}"] = s
    return out


def interleaved(runs: dict, repeats: int, repeat_seconds: float = 0.02) -> dict:
    """{name: median seconds per call} of ``runs`` ({name: (callable, input)}): each is
    timed in turn inside every one of ``repeats`` repeats (after 3 warm-up rounds), a
    repeat timing enough calls to last about ``repeat_seconds``."""
    for _ in range(3):  # warm-up: allocators, thread pools, kernels
        for run, x in runs.values():
            run(x)
    calls = {k: max(1, round(repeat_seconds / max(_timer(run, x, 1), 1e-6)))
             for k, (run, x) in runs.items()}
    times: dict = {k: [] for k in runs}
    for _ in range(repeats):
        for k, (run, x) in runs.items():
            times[k].append(_timer(run, x, calls[k]))
    return {k: statistics.median(ts) for k, ts in times.items()}


# -- the runs --------------------------------------------------------------------------------
def ours(base, train, flops: float, a: argparse.Namespace):
    import falcon_prune as fp

    t = time.perf_counter()
    r = fp.prune(base, train, flops=flops, method=a.method, structure="channels",
                 recalibrate_bn=1000, seed=a.seed, progress=False, **a.kwargs)
    return r, time.perf_counter() - t


def resnet20_budget(flops: float, a: argparse.Namespace, train, test, base, dense) -> list:
    """Every row of one budget: ours, then each Torch-Pruning criterion and mode."""
    rows = []
    r, seconds = ours(base, train, flops, a)
    macs, params = macs_params(r.model, train[0])
    rows.append({"network": "resnet20", "flops_budget": flops, "method": f"falcon-prune {a.method}",
                 "macs": macs, "flops_fraction": macs / dense[0], "params": params,
                 "params_fraction": params / dense[1], "seconds": seconds,
                 "config": r.config.to_dict(), "details": r.details,
                 **accuracies(r.model, train, test, a.ft_epochs, a.ft_lr, a.seed)})
    print(_line(rows[-1]), flush=True)
    models = {"ours": r.model}
    for name in a.tp_criteria:
        for glob in (True, False):
            t = time.perf_counter()
            m, ratio = tp_at_budget(base, name, flops, glob, train, dense[0])
            macs, params = macs_params(m, train[0])
            label = f"torch-pruning {name} {'global' if glob else 'uniform'}"
            models[label] = m
            rows.append({"network": "resnet20", "flops_budget": flops, "method": label,
                         "pruning_ratio": ratio, "macs": macs, "flops_fraction": macs / dense[0],
                         "params": params, "params_fraction": params / dense[1],
                         "seconds": time.perf_counter() - t,
                         **accuracies(m, train, test, a.ft_epochs, a.ft_lr, a.seed)})
            print(_line(rows[-1]), flush=True)
    return rows, models


def add_latency(rows: list, models: dict, a: argparse.Namespace) -> None:
    """Measure every network of ``models`` ({row index: network}, with "dense") side by
    side and store the latencies (and ratios to dense) in their rows."""
    lat = latencies(models, (3, 32, 32), (1, 64), a.repeats)
    for i, row in enumerate(rows):
        if i in lat:
            row["latency"], row["latency_dense"] = lat[i], lat["dense"]
            row["latency_ratio"] = {k: lat[i][k] / lat["dense"][k] for k in lat[i]}
            print(f"{row.get('flops_budget', 0):.2f} {row['method']:<32} latency ratio",
                  {k: round(v, 3) for k, v in row["latency_ratio"].items()}, flush=True)


def _line(row: dict) -> str:
    acc = " ".join(f"{k.removeprefix('accuracy_')} {row[k]:.4f}" for k in
                   ("accuracy_oneshot", "accuracy_bn", "accuracy_finetuned") if k in row)
    return (f"{row['flops_budget']:.2f} {row['method']:<32} FLOPs {row['flops_fraction']:.4f} "
            f"params {row['params_fraction']:.4f} {acc} {row['seconds']:.0f}s")


def unstructured(base, train, test, a: argparse.Namespace) -> tuple[dict, torch.nn.Module]:
    """An unstructured network at 30 % of the FLOPs: the same shapes with zeros."""
    import falcon_prune as fp

    r = fp.prune(base, train, flops=0.3, method="falcon", seed=a.seed, progress=False)
    model = fp.make_permanent(r.model)
    return {"network": "resnet20", "flops_budget": 0.3, "method": "falcon-prune falcon "
            "(structure='weights', unstructured)", "flops_fraction": r.flops_fraction,
            "accuracy_oneshot": fp.evaluate(model, test).metric}, model


def imagenet_rows(a: argparse.Namespace) -> list:
    """MobileNetV1 and ResNet50 at 224 x 224: group magnitude pruning on seeded synthetic
    images (latency only)."""
    import falcon_prune as fp
    from falcon_prune.models import create_model

    rows = []
    g = torch.Generator().manual_seed(a.seed)
    x, y = torch.randn(4, 3, 224, 224, generator=g), torch.randint(0, 1000, (4,), generator=g)
    for name in ("mobilenet_v1", "resnet50"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(a.seed)
            base = create_model(name).eval()
        dense = macs_params(base, x)
        models = {"dense": base}
        for flops in a.budgets:
            r = fp.prune(base, (x, y), flops=flops, method="mp", structure="channels",
                         progress=False)
            models[flops] = r.model
        lat = latencies(models, (3, 224, 224), (1, 16), a.imagenet_repeats)
        for flops in a.budgets:
            macs, params = macs_params(models[flops], x)
            rows.append({"network": name, "flops_budget": flops, "method": "falcon-prune mp",
                         "flops_fraction": macs / dense[0], "params_fraction": params / dense[1],
                         "latency": lat[flops], "latency_dense": lat["dense"],
                         "latency_ratio": {k: lat[flops][k] / lat["dense"][k]
                                           for k in lat[flops]}})
            print(name, flops, {k: round(v, 3) for k, v in rows[-1]["latency_ratio"].items()},
                  flush=True)
    return rows


def plot(rows: list, path: Path) -> None:
    """Accuracy after fine-tuning against batch-64 eager latency (fraction of dense) of
    every ResNet20 network: ours per budget, and each Torch-Pruning criterion and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    res = [r for r in rows if r["network"] == "resnet20" and "latency_ratio" in r
           and "accuracy_finetuned" in r]
    for method in dict.fromkeys(r["method"] for r in res):
        pts = sorted((r["latency_ratio"]["eager_b64"], 100 * r["accuracy_finetuned"])
                     for r in res if r["method"] == method)
        style = dict(marker="o", linewidth=2) if method.startswith("falcon") else \
            dict(marker=".", linestyle=":", alpha=0.7)
        ax.plot(*zip(*pts, strict=True), label=method, **style)
    ax.set_xlabel("torch eager latency at batch 64 (fraction of dense)")
    ax.set_ylabel("top-1 accuracy after fine-tuning (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def imagenet_only(a: argparse.Namespace, prov: dict) -> None:
    """Replace the ImageNet-size rows of the file ``a.out`` by a new measurement."""
    import json

    old = json.loads(a.out.read_text())
    rows = [r for r in old["rows"] if r["network"] == "resnet20"]
    earlier = [old["provenance"], *old.get("earlier_provenance", [])]
    record = {"command": old["command"], "imagenet_command": " ".join(["python", *sys.argv]),
              "rows": rows}
    rows += imagenet_rows(a)
    write_results(a.out, record, prov, earlier)
    if a.plot:
        plot(rows, a.plot)
    print(f"wrote {a.out}")


def speed_rows(record: dict, timed: dict, base, train, test, a: argparse.Namespace,
               prov: dict) -> None:
    """The unstructured network's row, every network's latency (``timed``: {row index:
    network}, with "dense") and the ImageNet-size rows, appended to ``record`` and
    written as they come."""
    rows = record["rows"]
    row, masked = unstructured(base, train, test, a)
    timed[len(rows)] = masked
    rows.append(row)
    add_latency(rows, timed, a)  # last, in a quiet process: nothing else runs meanwhile
    write_results(a.out, record, prov)
    if not a.skip_imagenet:
        rows += imagenet_rows(a)
        write_results(a.out, record, prov)


def main() -> None:
    import json

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.7, 0.5, 0.3])
    ap.add_argument("--method", default="falcon++")
    ap.add_argument("--kwargs", type=json.loads, default={},
                    help="further prune() settings for ours, as JSON")
    ap.add_argument("--tp-criteria", nargs="*", default=list(tp_criteria()),
                    choices=list(tp_criteria()),
                    help="Torch-Pruning criteria to compare with (default: all)")
    ap.add_argument("--ft-epochs", type=int, default=3)
    ap.add_argument("--ft-lr", type=float, default=0.01)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--imagenet-repeats", type=int, default=10)
    ap.add_argument("--skip-imagenet", action="store_true")
    ap.add_argument("--accuracy-only", action="store_true",
                    help="only the ResNet20 accuracy rows: no latency, no unstructured "
                         "network, no ImageNet-size networks")
    ap.add_argument("--imagenet-only", action="store_true",
                    help="only the ImageNet-size latency rows, appended to --out (its "
                         "ResNet20 rows and their provenance are kept)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/structured_speed.json"))
    ap.add_argument("--plot", type=Path, default=None)
    a = ap.parse_args()
    if a.accuracy_only and a.plot:
        ap.error("--plot draws accuracy against latency, which --accuracy-only skips")
    if not (SHARED / "checkpoints" / "resnet20_cifar10.pth.tar").exists():
        sys.exit(f"{SHARED} is absent: this benchmark needs the project's shared data")
    prov = {**provenance(), "torch_threads": torch.get_num_threads()}
    if a.imagenet_only:
        return imagenet_only(a, prov)
    train, test = data()
    base = resnet20()
    dense = macs_params(base, train[0])
    rows = [{"network": "resnet20", "method": "dense", "macs": dense[0], "params": dense[1],
             **accuracies(base, train, test, 0, a.ft_lr, a.seed)}]
    record = {"command": " ".join(["python", *sys.argv]), "rows": rows}
    timed = {"dense": base}
    for flops in a.budgets:
        new, models = resnet20_budget(flops, a, train, test, base, dense)
        timed.update({len(rows) + i: m for i, m in enumerate(models.values())})
        rows += new
        write_results(a.out, record, prov)
    if not a.accuracy_only:
        speed_rows(record, timed, base, train, test, a, prov)
    if a.plot:
        plot(rows, a.plot)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
