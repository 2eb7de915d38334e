"""Command line: ``falcon-prune prune | evaluate | demo``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from falcon_prune.api import clone_model, make_permanent, masks_of, prune
from falcon_prune.costs import count_macs
from falcon_prune.data import load_dataset
from falcon_prune.evaluation import accuracy
from falcon_prune.fisher import MemoryBudgetError
from falcon_prune.models import INPUT_SHAPES, MODELS, create_model, load_checkpoint
from falcon_prune.solvers import METHODS


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, choices=sorted(MODELS), help="zoo architecture")
    p.add_argument("--checkpoint", required=True, type=Path, help="weights to load")
    p.add_argument("--dataset", required=True, choices=["mnist", "cifar10", "imagenet"])
    p.add_argument("--data", required=True, type=Path,
                   help="data directory or .npz file (see README: Data)")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="falcon-prune",
        description="FLOP- and sparsity-constrained one-shot pruning (FALCON).",
    )
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a checkpoint to FLOP/NNZ budgets")
    _add_model_args(p)
    p.add_argument("--flops", type=float, help="fraction of the dense FLOPs to keep, in (0, 1]")
    p.add_argument("--nnz", type=float, help="fraction of the weights to keep, in (0, 1]")
    p.add_argument("--method", default="falcon", choices=METHODS)
    p.add_argument("--n-gradients", type=int, default=1000)
    p.add_argument("--samples-per-gradient", type=int, default=1)
    p.add_argument("--n-validation", type=int, default=1000,
                   help="held-out samples falcon uses to choose its ridge and exponent")
    p.add_argument("--ridge", type=float, default=1e-3)
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--memory-limit-gb", type=float, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True, type=Path, help="where to save the pruned model")
    p.add_argument("--report", type=Path, help="also write the report as JSON here")
    p.add_argument("--no-progress", action="store_true")

    e = sub.add_parser("evaluate", help="accuracy, FLOP and NNZ fractions of a checkpoint")
    _add_model_args(e)
    e.add_argument("--split", default="test")

    d = sub.add_parser("demo", help="train a tiny CNN on sklearn digits and prune it")
    d.add_argument("--flops", type=float, default=0.3)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-progress", action="store_true")
    return ap


def _example(model_name: str) -> torch.Tensor:
    return torch.zeros(1, *INPUT_SHAPES[model_name])


def cmd_prune(a: argparse.Namespace) -> int:
    model = load_checkpoint(create_model(a.model), a.checkpoint).eval()
    train = load_dataset(a.dataset, a.data, "train")
    limit = None if a.memory_limit_gb is None else int(a.memory_limit_gb * 2**30)
    r = prune(
        model, train, flops=a.flops, nnz=a.nnz, method=a.method, n_gradients=a.n_gradients,
        samples_per_gradient=a.samples_per_gradient, n_validation=a.n_validation,
        ridge=a.ridge, block_size=a.block_size, memory_limit=limit, device=a.device,
        seed=a.seed, progress=not a.no_progress,
    )
    print(r.table())
    print(r.summary())
    masks = masks_of(r.model)
    plain = make_permanent(clone_model(r.model))
    a.output.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": a.model, "state_dict": plain.state_dict(), "masks": masks,
                "report": r.to_dict()}, a.output)
    print(f"saved {a.output}")
    if a.report:
        a.report.write_text(json.dumps(r.to_dict(), indent=2, default=str))
        print(f"wrote {a.report}")
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    model = load_checkpoint(create_model(a.model), a.checkpoint).eval()
    data = load_dataset(a.dataset, a.data, a.split)
    kept, dense = count_macs(model, _example(a.model))
    weights = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Conv1d,
               torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear))]
    nnz = sum(int(w.count_nonzero()) for w in weights) / sum(w.numel() for w in weights)
    acc = accuracy(model, data)
    print(f"accuracy {acc:.4f} on {a.split} ({len(data)} samples); FLOPs kept "
          f"{kept / dense:.4f} ({kept:,.0f} of {dense:,.0f} MACs); weights kept {nnz:.4f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    try:
        if a.command == "prune":
            return cmd_prune(a)
        if a.command == "evaluate":
            return cmd_evaluate(a)
        from falcon_prune.demo import run_demo

        run_demo(flops=a.flops, seed=a.seed, progress=not a.no_progress)
        return 0
    except (ValueError, TypeError, FileNotFoundError, MemoryBudgetError) as e:
        print(f"falcon-prune: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
