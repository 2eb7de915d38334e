"""One-shot FALCON of an ImageNet-size network with 1 and 2 (or more) ranks of
``torch.distributed``, started by ``torchrun``: seconds, peak resident memory per rank, the
gradient matrix's bytes per rank, whether the masks and weights are the same, and the
largest number of gradients a rank count can hold under a per-process memory limit.

ImageNet is not available here, so the data are synthetic: seeded N(0, 1) images of
224 x 224 with seeded random labels (the gradients have ImageNet's shapes and cost; their
values say nothing about accuracy), as in ``scale_imagenet.py``. Each rank count is its
own ``torchrun`` job, one after the other; on a CPU machine the cores are split evenly
over the ranks (``torch.set_num_threads(cores // ranks)``), so every job uses the same
cores. On a machine with GPUs, ``--device cuda`` runs the same jobs with NCCL, one GPU
per rank.

Peak memory per rank is reported twice: the process's peak resident memory, and its increase
over the resident memory just before ``prune`` (which already holds torch, the model and the
caller's data, the same in every rank count): the latter is what the library itself needs.
glibc keeps freed blocks below its (moving) mmap threshold for reuse, so a peak also holds
memory that is free but not returned; ``--malloc-mmap-threshold`` sets
``MALLOC_MMAP_THRESHOLD_`` for every job to measure without most of it.

    python benchmarks/distributed_scale.py --model resnet50 --n-gradients 64 --ranks 1 2
    python benchmarks/distributed_scale.py --model resnet50 --device cuda --ranks 1 2 4 8

The largest n per rank count comes from the library's storage planner
(:func:`falcon_prune.storage.estimate_bytes`: X's share of the rows plus the solver's
whole-n and whole-p buffers) under a memory limit L (``--memory-limit-gb``, default 60 % of
this machine's available memory): ``largest_n_own_limit`` when every rank has L to itself
(one GPU or machine each), ``largest_n_shared_machine`` when the ranks share L on one
machine; it is what ``storage='memory'`` would accept.

Results go to ``--out`` (default ``benchmarks/results/distributed_scale.json``) with the
command and the provenance of the run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from isolated import provenance, save_rows


def worker(a: argparse.Namespace) -> None:
    """One rank: prune, then rank 0 prints the row (every rank's peak memory gathered)."""
    import torch
    import torch.distributed as dist

    import falcon_prune as fp
    from falcon_prune.loss.distributed import Ranks, process_group
    from falcon_prune.models import create_model
    from falcon_prune.results import peak_rss_mb

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if a.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    with process_group(a.device) as device:
        torch.manual_seed(a.seed)
        model = create_model(a.model).eval()
        g = torch.Generator().manual_seed(a.seed)
        n = a.n_gradients + a.n_validation
        x = torch.randn(n, 3, 224, 224, generator=g)
        y = torch.randint(0, 1000, (n,), generator=g)
        settings = {"memory_limit": int(a.memory_limit_gb * 2**30)} \
            if a.memory_limit_gb else {}
        before = current_rss_mb()  # torch, the model and the data: outside prune
        t = time.perf_counter()
        r = fp.prune(model, (x, y), flops=a.flops, method="falcon", n_gradients=a.n_gradients,
                     n_validation=a.n_validation, seed=a.seed, device=device,
                     storage="memory", dtype=getattr(torch, a.dtype),
                     progress=not a.no_progress, **settings)
        seconds = time.perf_counter() - t
        masks = fp.masks_of(r.model)
        weights = torch.cat([p.detach().reshape(-1).float() for _, p in
                             sorted(fp.make_permanent(fp.clone_model(r.model))
                                    .state_dict().items())])
        digest = hashlib.sha256(b"".join(masks[k].cpu().numpy().tobytes()
                                         for k in sorted(masks))).hexdigest()
        ranks = Ranks.current()
        rss = [(peak_rss_mb(), before)]
        if ranks.active:
            rss = [None] * ranks.world
            dist.all_gather_object(rss, (peak_rss_mb(), before))
        if ranks.is_main:
            torch.save(weights, Path(a.weights_dir) / f"weights_{ranks.world}.pt")
            rows = ranks.sizes(a.n_gradients)
            print("RESULT " + json.dumps({
                "model": a.model, "ranks": ranks.world, "device": str(device),
                "n_gradients": a.n_gradients, "n_validation": a.n_validation,
                "flops_budget": a.flops, "dtype": a.dtype, "num_weights": r.num_weights,
                "x_rows_per_rank": rows,
                "x_gib_per_rank": [k * r.num_weights * torch.empty((), dtype=getattr(
                    torch, a.dtype)).element_size() / 2**30 for k in rows],
                "seconds": seconds, "times": r.times, "peak_rss_mb_per_rank": [a for a, _ in rss],
                "rss_before_prune_mb_per_rank": [b for _, b in rss],
                "prune_peak_increase_mb_per_rank": [a - b for a, b in rss],
                "flops_fraction": r.flops_fraction, "nnz_fraction": r.nnz_fraction,
                "mask_sha256": digest, "storage": r.details.get("storage"),
                "distributed": r.details.get("distributed"),
                "threads_per_rank": torch.get_num_threads()}))


def current_rss_mb() -> float:
    """This process's resident memory now, MiB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def largest_n(p: int, dtype: str, world: int, limit: int) -> int:
    """The most gradients ``world`` ranks can hold in memory under ``limit`` bytes each."""
    import torch

    from falcon_prune.loss.planning import estimate_bytes

    lo, hi = 0, 1
    while estimate_bytes(hi, p, getattr(torch, dtype), world) <= limit:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if estimate_bytes(mid, p, getattr(torch, dtype), world) <= limit:
            lo = mid
        else:
            hi = mid
    return lo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet50", choices=["resnet50", "mobilenet_v1"])
    ap.add_argument("--n-gradients", type=int, default=64)
    ap.add_argument("--n-validation", type=int, default=0)
    ap.add_argument("--flops", type=float, default=0.3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--memory-limit-gb", type=float, default=None,
                    help="per process (default: the library's, 60 %% of the available RAM)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                    help="run every job with glibc's MALLOC_MMAP_THRESHOLD_=BYTES, so that "
                         "freed blocks above that size go back to the system at once")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--out", type=Path,
                    default=Path("benchmarks/results/distributed_scale.json"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--weights-dir", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a)
        return
    import torch

    from falcon_prune.loss.planning import default_memory_limit

    prov = provenance()
    argv = list(sys.argv[1:])
    rows: list[dict] = []
    scratch = tempfile.mkdtemp(prefix="distributed_scale_")
    for world in a.ranks:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={world}", __file__, *argv, "--worker", "--weights-dir",
               scratch]
        env = dict(os.environ)
        if a.malloc_mmap_threshold is not None:
            env["MALLOC_MMAP_THRESHOLD_"] = str(a.malloc_mmap_threshold)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
        if proc.returncode != 0 or "RESULT " not in proc.stdout:
            sys.exit(f"the run with {world} ranks failed (exit {proc.returncode})")
        row = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
        limit = int(a.memory_limit_gb * 2**30) if a.memory_limit_gb else default_memory_limit()
        row["malloc_mmap_threshold"] = a.malloc_mmap_threshold
        row["memory_limit_gib_per_process"] = limit / 2**30
        # every rank with the limit to itself (one GPU or machine each) ...
        row["largest_n_own_limit"] = largest_n(row["num_weights"], a.dtype, world, limit)
        # ... or the ranks sharing this one machine's limit
        row["largest_n_shared_machine"] = largest_n(row["num_weights"], a.dtype, world,
                                                    limit // world)
        row["same_mask_as_first"] = row["mask_sha256"] == (rows[0] if rows else row)[
            "mask_sha256"]
        first = torch.load(Path(scratch) / f"weights_{a.ranks[0]}.pt")
        this = torch.load(Path(scratch) / f"weights_{world}.pt")
        row["max_weight_difference_to_first"] = float((this - first).abs().max())
        row["max_abs_weight"] = float(first.abs().max())
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "times"}, indent=1))
        save_rows(a.out, rows, prov=prov)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
