"""One rank of a distributed run, started by ``torchrun`` from tests/test_distributed.py.

Usage: ``torchrun --standalone --nproc_per_node=N distributed_worker.py JOB BUNDLE OUT``.
BUNDLE is a ``torch.save``d dict with the model, the data and the keyword arguments; each
rank saves what it got to OUT/rank<r>.pt. JOB is ``prune``, ``differ`` (prune after rank
1 changed the model, the data or its memory limit), ``rows`` (the gradient matrix
of the bundle's model) or ``gradual`` (with ``stop_after``: rank 0 stops the run after
that many events, as an interruption would; ``rank1``: keyword arguments that rank 1 alone
uses).
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import falcon_prune as fp
from falcon_prune.analysis.costs import CostModel
from falcon_prune.data.batches import Samples


class Interrupted(Exception):
    pass


def run(job: str, b: dict) -> dict:
    if job == "prune":
        res = fp.prune(b["model"], b["data"], progress=False, **b["kwargs"])
        return {"masks": fp.masks_of(res.model), "state": res.model.state_dict(),
                "details": res.details, "flops": res.flops_fraction}
    if job == "differ":  # rank 1 changes a weight, the data or its memory limit
        model, (x, y) = b["model"], b["data"]
        kw = dict(b["kwargs"])
        what = kw.pop("what")
        if dist.get_rank() == 1:
            with torch.no_grad():
                if what == "model":
                    next(model.parameters()).view(-1)[0] += 1e-3
                elif what == "data":
                    x = x + 1e-3
                elif what == "memory":
                    kw["memory_limit"] = 1024
        try:
            fp.prune(model, (x, y), progress=False, **kw)
        except fp.FalconPruneError as e:
            return {"error": type(e).__name__, "message": str(e)}
        return {"error": None}
    if job == "gram":  # the Gram matrix of bfloat16 rows of the bundle's model
        model, (x, y) = b["model"], b["data"]
        cm = CostModel.from_model(model, x[:1])
        X = fp.gradient_store(model, cm, Samples((x, y)), b["kwargs"]["n"], progress=False,
                              precision=torch.bfloat16)
        return {"gram": X.gram()}
    if job == "rows":
        x, y = b["data"]
        cm = CostModel.from_model(b["model"], x[:1])
        kw = b["kwargs"]
        store = fp.gradient_store(b["model"], cm, Samples((x, y)), kw["n"],
                                  dtype=kw.get("dtype", torch.float64),
                                  storage=kw.get("storage", "memory"), progress=False)
        return {"local_rows": store.local.n, "start": store.start, "X": store.to_tensor(),
                "backend": store.local.backend, "plan": store.plan.describe(),
                "gram": store.gram(), "mv": store.matvec(torch.ones(cm.num_weights,
                                                                    dtype=store.compute_dtype))}
    if job == "gradual":
        kw = dict(b["kwargs"])
        stop = kw.pop("stop_after", None)
        own = kw.pop("rank1", {})
        if dist.get_rank() == 1:
            kw.update(own)
        seen = []

        def callback(row):
            seen.append(row)
            if stop is not None and len(seen) >= stop:
                raise Interrupted(f"stopped after {stop} events")

        try:
            res = fp.gradual(b["model"], b["data"], progress=False, callback=callback, **kw)
        except fp.FalconPruneError as e:
            return {"error": type(e).__name__, "message": str(e)}
        return {"masks": fp.masks_of(res.model), "state": res.model.state_dict(),
                "history": res.history, "flops": res.flops_fraction}
    raise SystemExit(f"unknown job {job}")


def main(job: str, bundle: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        record = run(job, torch.load(bundle, weights_only=False))
        record["world"] = dist.get_world_size()
        torch.save(record, Path(out) / f"rank{dist.get_rank()}.pt")
        dist.barrier()  # leave together: a rank that exits first can abort the other's gloo
    finally:
        dist.destroy_process_group()
    # the record is saved: leave without the interpreter's and gloo's destructors, whose
    # teardown once aborted a rank at exit ("terminate called without an active
    # exception") after a run that had succeeded
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(*sys.argv[1:4])
