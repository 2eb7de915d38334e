"""Command line: ``falcon-prune prune | gradual | evaluate | demo``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from falcon_prune.api import (
    METHODS,
    MULTISTAGE_DEFAULTS,
    clone_model,
    make_permanent,
    masks_of,
    prune,
)
from falcon_prune.costs import count_macs
from falcon_prune.data import load_dataset
from falcon_prune.evaluation import accuracy
from falcon_prune.fisher import MemoryBudgetError
from falcon_prune.models import INPUT_SHAPES, MODELS, create_model, load_checkpoint
from falcon_prune.schedules import KINDS, Schedule
from falcon_prune.storage import STORAGES

DTYPE_NAMES = {"float64": torch.float64, "float32": torch.float32,
               "float16": torch.float16, "bfloat16": torch.bfloat16}


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, choices=sorted(MODELS), help="zoo architecture")
    p.add_argument("--checkpoint", required=True, type=Path, help="weights to load")
    p.add_argument("--dataset", required=True, choices=["mnist", "cifar10", "imagenet"])
    p.add_argument("--data", required=True, type=Path,
                   help="data directory or .npz file (see README: Data)")


def _add_schedule_args(p: argparse.ArgumentParser, which: str, default_stages: int) -> None:
    p.add_argument("--stages", type=int, default=None,
                   help=f"{which}number of pruning stages (default {default_stages})")
    p.add_argument("--schedule", default=None, choices=KINDS,
                   help=f"{which}shape of the budget schedule (default cubic)")
    p.add_argument("--start", type=float, default=None,
                   help=f"{which}kept fraction at the first stage (default: from dense)")


def _schedule(a: argparse.Namespace, default_stages: int = 5, min_step: float = 0.0
              ) -> Schedule:
    given = getattr(a, "min_step", None)
    return Schedule(stages=default_stages if a.stages is None else a.stages,
                    kind=a.schedule or "cubic", start=a.start,
                    min_step=min_step if given is None else given)


def _check_prune_args(a: argparse.Namespace) -> None:
    """Refuse, before any work, options that the chosen method would not use."""
    if a.method != "falcon++":
        given = [f"--{k.replace('_', '-')}" for k in ("stages", "schedule", "start",
                                                       "min_step", "trajectory", "plot")
                 if getattr(a, k) is not None] + (["--revive"] if a.revive else []) \
            + (["--no-resample"] if a.no_resample else [])
        if given:
            raise ValueError(f"{', '.join(given)} only apply to --method falcon++")


def _save_model(path: Path, name: str, model, report: dict) -> None:
    masks = masks_of(model)
    plain = make_permanent(clone_model(model))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": name, "state_dict": plain.state_dict(), "masks": masks,
                "report": report}, path)
    print(f"saved {path}")


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
    p.add_argument("--n-gradients", type=int, default=None,
                   help="gradients (default 1000; falcon++: "
                        f"{MULTISTAGE_DEFAULTS['n_gradients']} per stage)")
    p.add_argument("--samples-per-gradient", type=int, default=None,
                   help="samples averaged into each gradient (default 1; falcon++: 2)")
    p.add_argument("--n-validation", type=int, default=None,
                   help="held-out samples falcon uses to choose its ridge and exponent "
                        "(default 1000; falcon++: 500)")
    p.add_argument("--ridge", type=float, default=1e-3)
    p.add_argument("--alpha", type=float, default=None,
                   help="scale of the first-order term of the quadratic model (default 0, "
                        "falcon++: 0.01)")
    p.add_argument("--block-size", type=int, default=None,
                   help="block-diagonal Hessian with blocks of this many weights")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPE_NAMES),
                   help="storage dtype of the gradient matrix")
    p.add_argument("--storage", default="auto", choices=STORAGES,
                   help="where the gradient matrix lives (auto: memory if it fits the limit, "
                        "else a smaller dtype, else disk)")
    p.add_argument("--scratch-dir", default=None,
                   help="directory for the on-disk gradient matrix (default: system temp)")
    p.add_argument("--memory-limit-gb", type=float, default=None,
                   help="memory limit for the gradient matrix and solver (default: 60%% of "
                        "the available RAM)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    _add_schedule_args(p, "falcon++ ", MULTISTAGE_DEFAULTS["stages"])
    p.add_argument("--min-step", type=float, default=None,
                   help="falcon++: merge stages that would prune less than this fraction of "
                        "the dense model into the next (default "
                        f"{MULTISTAGE_DEFAULTS['min_step']})")
    p.add_argument("--revive", action="store_true",
                   help="falcon++: let later stages bring back weights pruned earlier")
    p.add_argument("--no-resample", action="store_true",
                   help="falcon++: compute every stage's gradients on the same samples")
    p.add_argument("--recalibrate-bn", type=int, default=0, metavar="N",
                   help="re-estimate BatchNorm statistics on N samples after pruning "
                        "(default 0: keep them as trained)")
    p.add_argument("--output", required=True, type=Path, help="where to save the pruned model")
    p.add_argument("--report", type=Path, help="also write the report as JSON here")
    p.add_argument("--trajectory", type=Path,
                   help="falcon++: write the per-stage trajectory here (.csv or .json)")
    p.add_argument("--plot", type=Path, help="falcon++: plot the trajectory to this PNG")
    p.add_argument("--summary", type=Path, help="write a markdown summary here")
    p.add_argument("--no-progress", action="store_true")

    g = sub.add_parser("gradual", help="gradual pruning with fine-tuning between steps")
    _add_model_args(g)
    g.add_argument("--flops", type=float, help="fraction of the dense FLOPs to keep, in (0, 1]")
    g.add_argument("--nnz", type=float, help="fraction of the weights to keep, in (0, 1]")
    g.add_argument("--method", default="falcon", choices=[m for m in METHODS if m != "falcon++"])
    _add_schedule_args(g, "", 5)
    g.add_argument("--epochs-per-stage", type=int, default=1)
    g.add_argument("--final-epochs", type=int, default=2)
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--lr", type=float, default=0.01)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--n-gradients", type=int, default=500)
    g.add_argument("--n-validation", type=int, default=500)
    g.add_argument("--eval-split", default="test",
                   help="split evaluated after every step ('none' to skip)")
    g.add_argument("--checkpoint-dir", type=Path,
                   help="save the state after every step here (needed for --resume)")
    g.add_argument("--resume", action="store_true", help="continue the run in --checkpoint-dir")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cpu", help="where training and pruning run (cpu, cuda)")
    g.add_argument("--output", required=True, type=Path, help="where to save the pruned model")
    g.add_argument("--history", type=Path, help="write the history here (.csv or .json)")
    g.add_argument("--plot", type=Path, help="plot the trajectory to this PNG")
    g.add_argument("--summary", type=Path, help="write a markdown summary here")
    g.add_argument("--no-progress", action="store_true")

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
    _check_prune_args(a)
    model = load_checkpoint(create_model(a.model), a.checkpoint).eval()
    train = load_dataset(a.dataset, a.data, "train")
    limit = None if a.memory_limit_gb is None else int(a.memory_limit_gb * 2**30)
    multistage = {"schedule": _schedule(a, MULTISTAGE_DEFAULTS["stages"],
                                        MULTISTAGE_DEFAULTS["min_step"]),
                  "revive": a.revive,
                  "resample": not a.no_resample} if a.method == "falcon++" else {}
    r = prune(
        model, train, flops=a.flops, nnz=a.nnz, method=a.method, n_gradients=a.n_gradients,
        samples_per_gradient=a.samples_per_gradient, n_validation=a.n_validation,
        ridge=a.ridge, alpha=a.alpha, block_size=a.block_size, dtype=DTYPE_NAMES[a.dtype],
        storage=a.storage, scratch_dir=a.scratch_dir, memory_limit=limit, device=a.device,
        recalibrate_bn=a.recalibrate_bn, seed=a.seed, progress=not a.no_progress, **multistage,
    )
    print(r.table())
    print(r.summary())
    _save_model(a.output, a.model, r.model, r.to_dict())
    if a.report:
        a.report.write_text(json.dumps(r.to_dict(), indent=2, default=str))
        print(f"wrote {a.report}")
    if a.trajectory or a.plot:
        if a.trajectory:
            print(f"wrote {r.write_trajectory(a.trajectory)}")
        if a.plot:
            from falcon_prune.reports import plot_trajectory

            print(f"wrote {plot_trajectory(r.stages, a.plot, f'{a.model} {a.method}')}")
    if a.summary:
        from falcon_prune.reports import TRAJECTORY_COLUMNS, markdown_summary

        facts = {"model": a.model, "method": a.method, "FLOPs kept": f"{r.flops_fraction:.4f}",
                 "weights kept": f"{r.nnz_fraction:.4f}",
                 "BatchNorm": r.details["batchnorm"], "seconds": f"{r.times['total']:.1f}"}
        a.summary.write_text(markdown_summary(f"{a.model} pruned with {a.method}", facts,
                                              r.stages, TRAJECTORY_COLUMNS))
        print(f"wrote {a.summary}")
    return 0


def cmd_gradual(a: argparse.Namespace) -> int:
    from falcon_prune.gradual import gradual

    model = load_checkpoint(create_model(a.model), a.checkpoint).eval()
    train = load_dataset(a.dataset, a.data, "train")
    test = None if a.eval_split == "none" else load_dataset(a.dataset, a.data, a.eval_split)
    r = gradual(
        model, train, flops=a.flops, nnz=a.nnz, method=a.method, schedule=_schedule(a),
        epochs_per_stage=a.epochs_per_stage, final_epochs=a.final_epochs,
        batch_size=a.batch_size, lr=a.lr, momentum=a.momentum, weight_decay=a.weight_decay,
        eval_data=test, n_gradients=a.n_gradients, n_validation=a.n_validation,
        checkpoint_dir=a.checkpoint_dir, resume=a.resume, seed=a.seed, device=a.device,
        progress=not a.no_progress,
    )
    last = r.history[-1]
    acc = f", {a.eval_split} accuracy {last['eval_accuracy']:.4f}" if "eval_accuracy" in last \
        else ""
    print(f"gradual {a.method}: FLOPs kept {r.flops_fraction:.4f}, weights kept "
          f"{r.nnz_fraction:.4f}{acc}; {r.times['total']:.0f}s")
    _save_model(a.output, a.model, r.model, {"history": r.history, "times": r.times})
    if a.history:
        print(f"wrote {r.write_history(a.history)}")
    if a.plot:
        from falcon_prune.reports import plot_trajectory

        print(f"wrote {plot_trajectory(r.history, a.plot, f'{a.model} gradual {a.method}')}")
    if a.summary:
        from falcon_prune.reports import HISTORY_COLUMNS, markdown_summary

        facts = {"model": a.model, "method": a.method, "FLOPs kept": f"{r.flops_fraction:.4f}",
                 "weights kept": f"{r.nnz_fraction:.4f}", "seconds": f"{r.times['total']:.0f}"}
        a.summary.write_text(markdown_summary(f"{a.model}: gradual {a.method}", facts,
                                              r.history, HISTORY_COLUMNS))
        print(f"wrote {a.summary}")
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
        if a.command == "gradual":
            return cmd_gradual(a)
        from falcon_prune.demo import run_demo

        run_demo(flops=a.flops, seed=a.seed, progress=not a.no_progress)
        return 0
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, ImportError,
            MemoryBudgetError) as e:
        print(f"falcon-prune: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
