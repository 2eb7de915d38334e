"""What a falcon++ stage's gradients cost on this machine: the shared CIFAR-10 ResNet20,
gradients of 2 samples each (falcon++'s default), through ``falcon_prune.gradient_store``
(torch.func: vmap over grad of functional_call) at several chunk sizes, against one plain
batched forward + backward of the same samples (the cost of the gradient of the mean,
which carries no per-sample information: a lower bound, not an alternative). Seconds per
sample, medians of ``--repeats`` rounds that time every variant once (round-robin, after
one warm-up round), in one process.

    python benchmarks/gradient_speed.py --repeats 5

The rows are written to ``--out`` with the command, torch's thread count and the
provenance of the run (``isolated.provenance``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from isolated import provenance, write_results

from falcon_prune import CostModel, gradient_store
from falcon_prune.data.batches import Samples
from falcon_prune.data.datasets import load_cifar10
from falcon_prune.models import load_checkpoint, resnet20

SHARED = Path(__file__).resolve().parents[2] / "shared"


def interleaved_medians(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function, timed round-robin (every function once per round,
    after one warm-up round) so that drift of the machine affects them all alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats + 1):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            if r:  # round 0 warms up (allocator, oneDNN kernels)
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--chunks", type=int, nargs="+", default=[16, 64, 128, 256])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/gradient_speed.json"))
    a = ap.parse_args()
    prov = provenance()
    if not (SHARED / "checkpoints" / "resnet20_cifar10.pth.tar").exists():
        raise SystemExit(f"{SHARED} is absent: this benchmark needs the project's shared data")
    model = load_checkpoint(resnet20(), SHARED / "checkpoints" / "resnet20_cifar10.pth.tar")
    model.eval()
    x, y = load_cifar10(SHARED / "data" / "cifar10_subset.npz", "train").tensors
    x, y = x[: a.samples], y[: a.samples]
    cm = CostModel.from_model(model, x[:1])
    src = Samples((x, y))

    def plain() -> None:
        for i in range(0, a.samples, 256):
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[i : i + 256]), y[i : i + 256]).backward()

    fns = {f"torch.func per-gradient rows, chunk {c}": (lambda c=c: gradient_store(
        model, cm, src, a.samples // 2, 2, chunk=c, progress=False, storage="memory"))
        for c in a.chunks}
    fns["plain batched forward + backward (batch 256)"] = plain
    rows = [{"what": k, "seconds": s, "ms_per_sample": 1e3 * s / a.samples}
            for k, s in interleaved_medians(fns, a.repeats).items()]
    for r in rows:
        print(f"{r['what']:<45} {r['seconds']:6.2f} s  {r['ms_per_sample']:.2f} ms/sample")
    write_results(a.out, {
        "command": f"python benchmarks/gradient_speed.py --samples {a.samples} --chunks "
                   f"{' '.join(map(str, a.chunks))} --repeats {a.repeats}",
        "torch_threads": torch.get_num_threads(), "rows": rows}, prov)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
