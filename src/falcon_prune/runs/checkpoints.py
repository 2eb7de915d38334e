"""Checkpoints of a gradual run: the full state after every event (model and masks,
optimizer, LR schedule, RNG state, history), written atomically, and resumed only under
the same settings."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch

from falcon_prune.config import GradualConfig
from falcon_prune.data.batches import default_collate
from falcon_prune.errors import (
    CheckpointError,
    ConfigTypeError,
    FalconPruneError,
    MissingFileError,
)
from falcon_prune.loss.distributed import Ranks
from falcon_prune.runs.training import Feed

CHECKPOINT_NAME = "gradual.pt"


def run_record(config: GradualConfig, feed: Feed, optimizer, lr_scheduler, levels) -> dict:
    """Every setting that changes the result of a run, as plain values (a checkpoint refuses
    to resume under others); custom optimizer, LR schedule and collate_fn only as 'custom'."""
    record = config.to_dict()
    if optimizer is not None:
        for k in ("lr", "momentum", "weight_decay"):
            record.pop(k)
    record.update(
        optimizer="sgd" if optimizer is None else "custom",
        lr_scheduler="cosine" if lr_scheduler is None else "custom",
        levels=[list(b) for b in levels], n_train=len(feed.dataset),
        batch_size=feed.batch_size, drop_last=feed.loader_kw.get("drop_last", False),
        collate_fn="default" if feed.loader_kw.get("collate_fn") in (None, default_collate)
        else "custom")
    return record


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(path: Path, record: dict, next_event: int, model, opt, lrs,
                    history) -> None:
    """The full state after an event; written atomically."""
    state = {"config": record, "next_event": next_event, "model": model.state_dict(),
             "optimizer": opt.state_dict(), "lr_scheduler": lrs.state_dict(),
             "rng": _rng_state(), "history": history}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # an interruption never leaves half a checkpoint


def read_gradual_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise MissingFileError(f"resume=True but there is no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile,
            ValueError, AttributeError, ImportError) as e:
        raise CheckpointError(
            f"{path} cannot be read ({type(e).__name__}: {e}); it is corrupt or truncated. "
            "Delete it to start afresh, or use another checkpoint_dir") from e
    keys = {"config", "next_event", "model", "optimizer", "lr_scheduler", "rng", "history"}
    if not isinstance(state, dict) or not keys <= set(state):
        raise CheckpointError(f"{path} is not a checkpoint of falcon_prune.gradual (it lacks "
                              f"{sorted(keys - set(state)) if isinstance(state, dict) else keys})")
    return state


def load_checkpoint(path: Path, record: dict, model, opt, lrs) -> tuple[int, list[dict]]:
    """Restore a run's state (model, optimizer, LR schedule, RNG) from ``path`` after
    checking that it was saved under the same settings."""
    state = read_gradual_checkpoint(path)
    saved = state["config"]
    if saved != record:
        absent = "<not set>"
        diff = {k: (saved.get(k, absent), record.get(k, absent))
                for k in sorted(saved.keys() | record.keys())
                if saved.get(k, absent) != record.get(k, absent)}
        raise CheckpointError(
            f"{path} belongs to a run with other settings {diff} (saved, now); resume with "
            "the same arguments or use another checkpoint_dir")
    try:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        lrs.load_state_dict(state["lr_scheduler"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path} does not fit this model or optimizer ({e})") from e
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["next_event"], state["history"]


def resumed(path: Path, record: dict, model, opt, lrs, ranks: Ranks) -> tuple[int, list]:
    """:func:`load_checkpoint` on every rank, which must all read it and stand at the same
    event: a ``checkpoint_dir`` that some rank's machine does not see stops every rank."""
    try:
        (start, history), failure = load_checkpoint(path, record, model, opt, lrs), None
    except FalconPruneError as e:
        (start, history), failure = (-1, []), e
    ranks.raise_together(failure, CheckpointError(
        f"another process could not resume from {path} (its message says why); "
        "checkpoint_dir must be a directory that every rank sees"))
    if not ranks.same(start):
        raise CheckpointError(
            f"the processes read checkpoints at different events from {path}; "
            "checkpoint_dir must be one directory that every rank sees")
    return start, history


def check_scheduler(lrs: object, checkpointing: bool) -> None:
    """The LR schedule must step; with checkpoints it must also save and restore its state."""
    name = type(lrs).__name__
    if not callable(getattr(lrs, "step", None)):
        raise ConfigTypeError(
            f"lr_scheduler(optimizer, total_epochs) returned a {name} without step(); return "
            "a torch.optim.lr_scheduler object (or one with step())")
    if checkpointing and not all(callable(getattr(lrs, m, None))
                                 for m in ("state_dict", "load_state_dict")):
        raise ConfigTypeError(
            f"the lr_scheduler ({name}) has no state_dict()/load_state_dict(), so a checkpoint "
            "could not save its position and a resumed run would restart its schedule; with "
            "checkpoint_dir the scheduler must provide state_dict and load_state_dict (every "
            "torch.optim.lr_scheduler does), or run without checkpoint_dir")
