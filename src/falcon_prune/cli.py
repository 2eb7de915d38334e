"""Command line: ``falcon-prune prune | gradual | evaluate | methods | demo``.

Under ``torchrun`` (``torchrun --nproc_per_node=N -m falcon_prune prune ...``), ``prune``
and ``gradual`` run as one distributed job (:mod:`falcon_prune.loss.distributed`) and rank 0
alone prints and writes the outputs.

Every path is checked before any expensive work (the checkpoint is read, the data loaded,
every output and the scratch directory found writable). A user error prints one line and
exits with status 2; anything else (a bug) keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from falcon_prune.analysis.masks import masks_of, plain_copy
from falcon_prune.arguments import DTYPE_NAMES, build_parser
from falcon_prune.config import defaults
from falcon_prune.errors import ConfigError, DependencyError, FalconPruneError, PathError
from falcon_prune.loss.distributed import Ranks, process_group
from falcon_prune.loss.planning import check_scratch_dir
from falcon_prune.methods import get_method, method_names
from falcon_prune.methods.schedules import Schedule

MULTISTAGE_ONLY = ("effort", "stages", "schedule", "start", "min_step", "trajectory", "plot")


# -- path checks -----------------------------------------------------------------------------
def check_output(path: Path | None, what: str) -> None:
    """Refuse an output path that is a directory or cannot be written: the file itself if
    it exists, else its nearest existing parent directory (tried with a temporary file)."""
    if path is None:
        return
    if path.is_dir():
        raise PathError(f"{what} {path} is a directory; give a file name")
    try:
        if path.exists():
            with open(path, "ab"):
                pass
            return
        parent = path.parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise PathError(f"{what} {path} cannot be created: {parent} is not a directory")
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise PathError(f"{what} {path} cannot be written ({e.strerror or e}); choose "
                        "another path") from e


def check_output_dir(path: Path, what: str) -> None:
    """Refuse an output directory that is a file or cannot be created."""
    if path.exists() and not path.is_dir():
        raise PathError(f"{what} {path} is a file; give a directory (save_pretrained writes "
                        "several files)")
    check_output(path / "config.json", what)


def check_plots(*paths: Path | None) -> None:
    """Plots need matplotlib: refuse before the work when it is missing."""
    if any(p is not None for p in paths):
        try:
            import matplotlib  # noqa: F401
        except ImportError as e:
            raise DependencyError(
                "--plot needs matplotlib: pip install 'falcon-prune[plots]'") from e


def _load(a: argparse.Namespace, split: str = "train"):
    """The zoo model with the checkpoint loaded, and the data split (both checked)."""
    from falcon_prune.data.datasets import load_dataset
    from falcon_prune.models import load_model

    model = load_model(a.model, a.checkpoint).eval()
    return model, load_dataset(a.dataset, a.data, split)


def _save_model(path: Path, name: str, model, report: dict, structure: str = "weights"
                ) -> None:
    """The pruned weights (and masks) as a state dict; a network made physically smaller
    (structure='channels') is saved whole under ``"module"`` as well, since its shapes
    are no longer the zoo's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"model": name, "state_dict": plain_copy(model).state_dict(),
             "masks": masks_of(model), "report": report}
    if structure == "channels":
        state["module"] = plain_copy(model)
    torch.save(state, path)
    print(f"saved {path}")


# -- arguments -------------------------------------------------------------------------------
def _source(a: argparse.Namespace) -> str:
    """'hf' or 'zoo', after checking that exactly one kind of model was given in full."""
    zoo = {"--model": a.model, "--checkpoint": a.checkpoint, "--dataset": a.dataset,
           "--data": a.data}
    if a.hf is not None:
        extra = [k for k, v in zoo.items() if v is not None]
        if extra or not a.text:
            raise ConfigError("--hf takes --text FILE (the text to calibrate or evaluate "
                              "on)" + (f" and not {', '.join(extra)}" if extra else ""))
        if a.seq_len < 2:
            raise ConfigError(f"--seq-len must be at least 2, got {a.seq_len}")
        for path in [a.hf, *a.text]:
            if not path.exists():
                raise PathError(f"{path} does not exist")
        return "hf"
    missing = [k for k, v in zoo.items() if v is None]
    if missing:
        raise ConfigError(f"give {', '.join(missing)} (a zoo model and its data), or --hf "
                          "DIR_OR_GGUF --text FILE for a language model")
    return "zoo"


def _language_data(a: argparse.Namespace):
    """The language model, its tokenizer and the token sequences of --text."""
    from falcon_prune.data.text import read_text, token_sequences
    from falcon_prune.models import load_language_model

    model, tokenizer = load_language_model(a.hf)
    ids = token_sequences(read_text(a.text), tokenizer, a.seq_len, a.max_sequences)
    return model, tokenizer, ids


# -- commands --------------------------------------------------------------------------------
def _multistage_settings(a: argparse.Namespace) -> dict:
    """A multi-stage method's schedule, revive and resample from the flags; refused for the
    single-stage ones."""
    given = [f"--{k.replace('_', '-')}" for k in MULTISTAGE_ONLY if getattr(a, k) is not None]
    given += ["--revive"] * a.revive + ["--no-resample"] * a.no_resample
    if not get_method(a.method).multistage:
        if given:
            raise ConfigError(f"{', '.join(given)} only apply to --method "
                              f"{' or '.join(method_names(multistage=True))} (multi-stage "
                              "methods)")
        return {}
    out: dict = {"revive": a.revive or None, "resample": False if a.no_resample else None,
                 "effort": a.effort}
    if any(getattr(a, k) is not None for k in ("stages", "schedule", "start", "min_step")):
        ms = defaults(a.method, effort=a.effort or "default").schedule
        out["schedule"] = Schedule(a.stages or ms.stages, a.schedule or "cubic", a.start,
                                   min_step=ms.min_step if a.min_step is None else a.min_step)
    return out


def _prune_settings(a: argparse.Namespace) -> dict:
    limit = None if a.memory_limit_gb is None else int(a.memory_limit_gb * 2**30)
    return {
        "n_gradients": a.n_gradients, "samples_per_gradient": a.samples_per_gradient,
        "n_validation": a.n_validation, "ridge": a.ridge, "alpha": a.alpha,
        "block_size": a.block_size, "dtype": DTYPE_NAMES.get(a.dtype), "storage": a.storage,
        "gradient_precision": a.gradient_precision, "latency_batch": a.latency_batch,
        "latency_tokens": a.latency_tokens,
        "held_out_precision": a.held_out_precision,
        "scratch_dir": a.scratch_dir, "memory_limit": limit, "sampling": a.sampling,
        "min_density": a.min_density, "allow_empty_layers": a.allow_empty_layers or None,
        "recalibrate_bn": a.recalibrate_bn or None, **_multistage_settings(a),
        **_structure_settings(a), "pattern": a.pattern, "loss_model": a.loss_model,
        "n_calibration": a.n_calibration, "allocation": a.allocation, "passes": a.passes,
        "blocks": a.blocks, "attention_units": a.attention_units,
    }


def _structure_settings(a: argparse.Namespace) -> dict:
    out = {"structure": a.structure if a.structure != "weights" else None,
           "round_to": a.round_to, "keep_layers": a.keep_layers}
    if a.structure == "weights" and (a.round_to or a.keep_layers):
        raise ConfigError("--round-to and --keep-layers apply to --structure channels")
    return out


def _write_prune_outputs(a: argparse.Namespace, r) -> None:
    if a.report:
        a.report.parent.mkdir(parents=True, exist_ok=True)
        a.report.write_text(json.dumps(r.to_dict(), indent=2, default=str))
        print(f"wrote {a.report}")
    if a.trajectory:
        print(f"wrote {r.write_trajectory(a.trajectory)}")
    if a.plot:
        from falcon_prune.reports import plot_trajectory

        print(f"wrote {plot_trajectory(r.stages, a.plot, f'{a.model or a.hf.name} {a.method}')}")
    if a.summary:
        from falcon_prune.reports import TRAJECTORY_COLUMNS, markdown_summary

        facts = {"model": a.model or a.hf.name, "method": a.method,
                 "FLOPs kept": f"{r.flops_fraction:.4f}",
                 "weights kept": f"{r.nnz_fraction:.4f}",
                 "BatchNorm": r.details["batchnorm"], "seconds": f"{r.times['total']:.1f}"}
        a.summary.parent.mkdir(parents=True, exist_ok=True)
        a.summary.write_text(markdown_summary(f"{facts['model']} pruned with {a.method}", facts,
                                              r.stages, TRAJECTORY_COLUMNS))
        print(f"wrote {a.summary}")


def cmd_prune(a: argparse.Namespace) -> int:
    from falcon_prune.api import prune

    settings = _prune_settings(a)
    hf = _source(a) == "hf"
    for path, what in ((a.report, "--report"), (a.trajectory, "--trajectory"),
                       (a.plot, "--plot"), (a.summary, "--summary")):
        check_output(path, what)
    check_output_dir(a.output, "--output") if hf else check_output(a.output, "--output")
    check_plots(a.plot)
    if a.scratch_dir is not None or a.storage == "disk":
        check_scratch_dir(a.scratch_dir)
    if hf:
        model, tokenizer, train = _language_data(a)
        settings["task"] = "language_modeling"
    else:
        model, train = _load(a)
    with process_group(a.device) as device:
        r = prune(model, train, flops=a.flops, nnz=a.nnz, method=a.method, seed=a.seed,
                  device=device, progress=not a.no_progress, latency=a.latency, **settings)
        if not Ranks.current().is_main:  # under torchrun, rank 0 alone reports and writes
            return 0
    print(r.table())
    print(r.summary())
    if hf:
        from falcon_prune.models import save_language_model

        print(f"saved {save_language_model(r.model, tokenizer, a.output)} (save_pretrained)")
    else:
        _save_model(a.output, a.model, r.model, r.to_dict(), a.structure)
    _write_prune_outputs(a, r)
    return 0


def cmd_gradual(a: argparse.Namespace) -> int:
    from falcon_prune.runs.checkpoints import CHECKPOINT_NAME, read_gradual_checkpoint
    from falcon_prune.runs.gradual import gradual

    if _source(a) == "hf":
        raise ConfigError("gradual fine-tunes a zoo model on its dataset; --hf language "
                          "models are pruned one-shot with 'falcon-prune prune --hf'")
    for path, what in ((a.output, "--output"), (a.history, "--history"), (a.plot, "--plot"),
                       (a.summary, "--summary")):
        check_output(path, what)
    check_plots(a.plot)
    if a.checkpoint_dir is not None:
        check_output(a.checkpoint_dir / CHECKPOINT_NAME, "--checkpoint-dir")
        if a.resume:
            read_gradual_checkpoint(a.checkpoint_dir / CHECKPOINT_NAME)
    schedule = None
    if any(x is not None for x in (a.stages, a.schedule, a.start)):
        schedule = Schedule(a.stages or 5, a.schedule or "cubic", a.start)
    model, train = _load(a)
    from falcon_prune.data.datasets import load_dataset

    test = None if a.eval_split == "none" else load_dataset(a.dataset, a.data, a.eval_split)
    with process_group(a.device) as device:
        r = gradual(
            model, train, flops=a.flops, nnz=a.nnz, method=a.method, schedule=schedule,
            epochs_per_stage=a.epochs_per_stage, final_epochs=a.final_epochs,
            batch_size=a.batch_size, lr=a.lr, momentum=a.momentum,
            weight_decay=a.weight_decay, bn_batches=a.bn_batches, eval_data=test,
            n_gradients=a.n_gradients, n_validation=a.n_validation,
            min_density=a.min_density, allow_empty_layers=a.allow_empty_layers or None,
            **_structure_settings(a), checkpoint_dir=a.checkpoint_dir, resume=a.resume,
            seed=a.seed, device=device, progress=not a.no_progress)
        if not Ranks.current().is_main:
            return 0
    last = r.history[-1]
    acc = (f", {a.eval_split} accuracy {last['eval_accuracy']:.4f}"
           if "eval_accuracy" in last else "")
    print(f"gradual {a.method}: FLOPs kept {r.flops_fraction:.4f}, weights kept "
          f"{r.nnz_fraction:.4f}{acc}; {r.times['total']:.0f}s")
    _save_model(a.output, a.model, r.model, {"config": r.config.to_dict(),
                                              "history": r.history, "times": r.times},
                a.structure)
    if a.history:
        print(f"wrote {r.write_history(a.history)}")
    if a.plot:
        from falcon_prune.reports import plot_trajectory

        print(f"wrote {plot_trajectory(r.history, a.plot, f'{a.model} gradual {a.method}')}")
    if a.summary:
        from falcon_prune.reports import HISTORY_COLUMNS, markdown_summary

        facts = {"model": a.model, "method": a.method, "FLOPs kept": f"{r.flops_fraction:.4f}",
                 "weights kept": f"{r.nnz_fraction:.4f}", "seconds": f"{r.times['total']:.0f}"}
        a.summary.parent.mkdir(parents=True, exist_ok=True)
        a.summary.write_text(markdown_summary(f"{a.model}: gradual {a.method}", facts,
                                              r.history, HISTORY_COLUMNS))
        print(f"wrote {a.summary}")
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    """Accuracy on the split, and FLOPs and weights kept against the zoo's dense model
    (so a physically smaller network is measured against the network it came from)."""
    from falcon_prune.analysis.prunable import prunable_parameters
    from falcon_prune.api import count_macs
    from falcon_prune.data.evaluation import evaluate
    from falcon_prune.models import INPUT_SHAPES, create_model

    if _source(a) == "hf":
        return _evaluate_language_model(a)
    model, data = _load(a, a.split)
    example = torch.zeros(1, *INPUT_SHAPES[a.model])
    kept, _ = count_macs(model, example)
    dense_model = create_model(a.model).eval()
    _, dense = count_macs(dense_model, example)
    nnz = sum(int(getattr(m, p).count_nonzero()) for _, m, p, _ in prunable_parameters(model))
    nnz /= sum(getattr(m, p).numel() for _, m, p, _ in prunable_parameters(dense_model))
    ev = evaluate(model, data)
    print(f"accuracy {ev.metric:.4f} on {a.split} ({ev.samples} samples); FLOPs kept "
          f"{kept / dense:.4f} ({kept:,.0f} of {dense:,.0f} MACs); weights kept {nnz:.4f}")
    return 0


def _evaluate_language_model(a: argparse.Namespace) -> int:
    """The perplexity of --hf on the sequences of --text, and its weights' density."""
    from falcon_prune.data.text import perplexity

    model, _, ids = _language_data(a)
    linear = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    kept = sum(int(w.count_nonzero()) for w in linear) / sum(w.numel() for w in linear)
    print(f"perplexity {perplexity(model, ids):.4f} on {len(ids)} sequences of "
          f"{ids.shape[1]} tokens; linear weights kept {kept:.4f}")
    return 0


def cmd_methods() -> int:
    """One line per registered method: its name, structures, what it uses, its summary."""
    for name in method_names():
        m = get_method(name)
        uses = [w for w, on in (("gradients", m.gradients), ("held-out", m.held_out),
                                ("multi-stage", m.multistage)) if on]
        print(f"{name:<12} {'/'.join(m.structures):<17} {', '.join(uses) or '-':<33} "
              f"{m.summary}")
    return 0


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        if a.command == "prune":
            return cmd_prune(a)
        if a.command == "evaluate":
            return cmd_evaluate(a)
        if a.command == "gradual":
            return cmd_gradual(a)
        if a.command == "methods":
            return cmd_methods()
        from falcon_prune.demo import run_demo

        run_demo(flops=a.flops, seed=a.seed, progress=not a.no_progress)
        return 0
    except FalconPruneError as e:
        print(f"falcon-prune: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
