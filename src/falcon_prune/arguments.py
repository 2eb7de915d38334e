"""The command line's arguments: ``build_parser()`` defines the subcommands ``prune``,
``gradual``, ``evaluate``, ``methods`` and ``demo`` and their flags (:mod:`falcon_prune.cli`
checks and runs them)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from falcon_prune.config import EFFORTS, GRADIENT_PRECISIONS, defaults
from falcon_prune.loss.planning import STORAGES
from falcon_prune.methods import method_names
from falcon_prune.methods.schedules import KINDS

#: the --dtype choices: the storage dtype of the gradient matrix
DTYPE_NAMES = {"float64": torch.float64, "float32": torch.float32,
               "float16": torch.float16, "bfloat16": torch.bfloat16}


def _add_model_args(p: argparse.ArgumentParser) -> None:
    """A zoo model (--model, --checkpoint, --dataset, --data) or a language model (--hf,
    --text)."""
    from falcon_prune.models import MODELS

    p.add_argument("--model", choices=sorted(MODELS), help="zoo architecture")
    p.add_argument("--checkpoint", type=Path, help="weights to load")
    p.add_argument("--dataset", choices=["mnist", "cifar10", "imagenet"])
    p.add_argument("--data", type=Path,
                   help="data directory or .npz file (see docs/api.md: data)")
    p.add_argument("--hf", type=Path, metavar="DIR_OR_GGUF",
                   help="a HuggingFace causal language model: a directory or a .gguf file "
                        "(instead of --model/--checkpoint/--dataset/--data)")
    p.add_argument("--text", type=Path, nargs="+", metavar="FILE",
                   help="with --hf: text files, cut into sequences of --seq-len tokens")
    p.add_argument("--seq-len", type=int, default=512, help="with --hf: tokens per sequence")
    p.add_argument("--max-sequences", type=int, help="with --hf: use at most this many")


def _add_budget_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--flops", type=float, help="fraction of the dense FLOPs to keep, in (0, 1]")
    p.add_argument("--nnz", type=float, help="fraction of the weights to keep, in (0, 1]")
    p.add_argument("--min-density", type=float, default=None,
                   help="every layer keeps at least this fraction of its weights")
    p.add_argument("--allow-empty-layers", action="store_true",
                   help="let a layer lose every weight (by default each keeps one)")
    p.add_argument("--structure", choices=["weights", "channels"], default="weights",
                   help="weights: unstructured masks (default); channels: remove whole "
                        "channels, a physically smaller network (needs torch-pruning)")
    p.add_argument("--round-to", type=int, help="channels: keep multiples of this many "
                   "channels per group")
    p.add_argument("--keep-layers", nargs="+", metavar="NAME",
                   help="channels: modules whose output channels stay whole")
    p.add_argument("--pattern", help="n:m sparsity in every layer, e.g. 2:4 (layer-wise)")


def _add_prune(sub) -> None:
    ms = defaults("falcon++")
    p = sub.add_parser("prune", help="prune a checkpoint to FLOP/NNZ budgets")
    _add_model_args(p)
    _add_budget_args(p)
    p.add_argument("--method", default="falcon", choices=method_names(),
                   help="a registered method (falcon-prune methods lists them)")
    p.add_argument("--n-gradients", type=int, help="gradients (default 1000; falcon++: "
                   f"{ms.n_gradients} per stage)")
    p.add_argument("--samples-per-gradient", type=int,
                   help=f"samples averaged into each gradient (default 1; falcon++: "
                        f"{ms.samples_per_gradient})")
    p.add_argument("--n-validation", type=int,
                   help="held-out samples falcon chooses its ridge and exponent on (default "
                        f"1000; falcon++: {ms.n_validation})")
    p.add_argument("--ridge", type=float)
    p.add_argument("--alpha", type=float, help="scale of the first-order term (default 0; "
                   f"falcon++: {ms.alpha})")
    p.add_argument("--latency", type=float, help="channels: fraction of the dense network's "
                   "measured time per forward to keep, in (0, 1] (alone or with --flops; not "
                   "with --nnz)")
    p.add_argument("--latency-batch", type=int, help="batch size the latency is measured at "
                   "(default 1)")
    p.add_argument("--latency-tokens", type=int, help="language models (layer-wise): tokens "
                   "per sequence the latency is measured at (1: one decoding step; default "
                   "the calibration length)")
    _add_loss_model_args(p, ms)
    _add_layerwise_args(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampling", choices=["random", "first"])
    _add_multistage_args(p, ms)
    p.add_argument("--recalibrate-bn", type=int, default=0, metavar="N",
                   help="re-estimate BatchNorm statistics on N samples after pruning")
    p.add_argument("--output", required=True, type=Path, help="where to save the pruned model")
    p.add_argument("--report", type=Path, help="also write the report as JSON here")
    p.add_argument("--trajectory", type=Path, help="falcon++: per-stage trajectory (.csv/.json)")
    p.add_argument("--plot", type=Path, help="falcon++: plot the trajectory to this PNG")
    p.add_argument("--summary", type=Path, help="write a markdown summary here")
    p.add_argument("--no-progress", action="store_true")


def _add_loss_model_args(p: argparse.ArgumentParser, ms) -> None:
    """How the gradient matrix is computed and stored, and the held-out scores' precision
    (``ms``: falcon++'s defaults, named in the help)."""
    p.add_argument("--block-size", type=int, help="block-diagonal Hessian, blocks of this size")
    p.add_argument("--dtype", choices=sorted(DTYPE_NAMES), help="storage of the gradient matrix")
    p.add_argument("--gradient-precision", choices=GRADIENT_PRECISIONS,
                   help="compute the gradient rows in the model's dtype, in bfloat16, or "
                   "auto (bfloat16 where the device multiplies it natively and the model is "
                   f"not float64); default model, falcon++: {ms.gradient_precision}")
    p.add_argument("--held-out-precision", choices=GRADIENT_PRECISIONS,
                   help="falcon/falcon++: score the candidates on the held-out samples in the "
                   f"model's dtype, in bfloat16, or auto; default model, falcon++: "
                   f"{ms.held_out_precision}")
    p.add_argument("--storage", choices=STORAGES, help="where the gradient matrix lives (auto: "
                   "memory if it fits the limit, else a smaller dtype, else disk)")
    p.add_argument("--scratch-dir", help="directory for an on-disk gradient matrix")
    p.add_argument("--memory-limit-gb", type=float,
                   help="memory limit for the gradient matrix (default: 60%% of available RAM)")


def _add_layerwise_args(p: argparse.ArgumentParser) -> None:
    """The layer-wise loss model's settings (falcon, sparsegpt, wanda)."""
    p.add_argument("--loss-model", choices=["global", "layerwise", "auto"],
                   help="falcon: gradient rows of the whole network, or each layer's input "
                        "Gram block by block (default auto: layer-wise when the global "
                        "model would not fit the memory limit)")
    p.add_argument("--n-calibration", type=int, help="layer-wise: calibration sequences "
                   "(default 128)")
    p.add_argument("--allocation", choices=["ilp", "uniform", "owl"],
                   help="layer-wise: each layer's density by the knapsack of error curves "
                        "(falcon's default), one density for all, or by outlier features")
    p.add_argument("--passes", type=int, choices=[1, 2],
                   help="layer-wise: 2 measures the curves again on pruned inputs")
    p.add_argument("--blocks", help="layer-wise: the path of the model's nn.ModuleList of "
                   "blocks (default: found)")
    p.add_argument("--attention-units", choices=["groups", "heads"],
                   help="layer-wise --structure channels: remove key/value groups with their "
                        "query heads (default), or the same query head of every group")


def _add_multistage_args(p: argparse.ArgumentParser, ms) -> None:
    """A multi-stage method's preset, schedule, revive and resample."""
    p.add_argument("--effort", choices=list(EFFORTS),
                   help="falcon++: preset of stages, gradients and candidates (default: "
                        "default; 'best' is the most accurate in about 2.5x the time, "
                        "'fast' trades accuracy for 0.4x the time; docs/benchmarks.md)")
    p.add_argument("--stages", type=int, help=f"falcon++: stages (default {ms.schedule.stages})")
    p.add_argument("--schedule", choices=KINDS, help="falcon++: schedule shape (default cubic)")
    p.add_argument("--start", type=float, help="falcon++: kept fraction at the first stage")
    p.add_argument("--min-step", type=float, help="falcon++: merge stages pruning less than "
                   f"this fraction into the next (default {ms.schedule.min_step})")
    p.add_argument("--revive", action="store_true", help="falcon++: let later stages bring "
                   "back weights pruned earlier")
    p.add_argument("--no-resample", action="store_true",
                   help="falcon++: every stage's gradients on the same samples")


def _add_gradual(sub) -> None:
    g = sub.add_parser("gradual", help="gradual pruning with fine-tuning between steps")
    _add_model_args(g)
    _add_budget_args(g)
    g.add_argument("--method", default="falcon", choices=method_names(multistage=False),
                   help="a single-stage registered method")
    g.add_argument("--stages", type=int, help="pruning steps (default 5)")
    g.add_argument("--schedule", choices=KINDS, help="schedule shape (default cubic)")
    g.add_argument("--start", type=float, help="kept fraction at the first step")
    for flag, kind, default in (("--epochs-per-stage", int, 1), ("--final-epochs", int, 2),
                                ("--batch-size", int, 128), ("--lr", float, 0.01),
                                ("--momentum", float, 0.9), ("--weight-decay", float, 5e-4),
                                ("--bn-batches", int, 20)):
        g.add_argument(flag, type=kind, default=default, help=f"default {default}")
    g.add_argument("--n-gradients", type=int, help="gradients per step (default 500)")
    g.add_argument("--n-validation", type=int, help="held-out samples per step (default 500)")
    g.add_argument("--eval-split", default="test", help="split evaluated after every step "
                   "('none' to skip)")
    g.add_argument("--checkpoint-dir", type=Path, help="save the state after every step here")
    g.add_argument("--resume", action="store_true", help="continue the run in --checkpoint-dir")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cpu", help="where training and pruning run")
    g.add_argument("--output", required=True, type=Path, help="where to save the pruned model")
    g.add_argument("--history", type=Path, help="write the history here (.csv or .json)")
    g.add_argument("--plot", type=Path, help="plot the trajectory to this PNG")
    g.add_argument("--summary", type=Path, help="write a markdown summary here")
    g.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="falcon-prune", description="FLOP- and sparsity-"
                                 "constrained pruning of PyTorch networks (FALCON).")
    sub = ap.add_subparsers(dest="command", required=True)
    _add_prune(sub)
    _add_gradual(sub)
    e = sub.add_parser("evaluate", help="accuracy, FLOP and NNZ fractions of a checkpoint")
    _add_model_args(e)
    e.add_argument("--split", default="test")
    sub.add_parser("methods", help="list the registered methods")
    d = sub.add_parser("demo", help="train a tiny CNN on sklearn digits and prune it")
    d.add_argument("--flops", type=float, default=0.3)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-progress", action="store_true")
    return ap
