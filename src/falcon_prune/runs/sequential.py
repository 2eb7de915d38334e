"""Calibration data through a model one block at a time (the layer-wise loss model).

The model's blocks (:mod:`falcon_prune.analysis.blocks`) are run in turn on the
calibration sequences: the inputs of the first block are caught once (the model runs until
it reaches that block), then each block runs on its inputs and its outputs are the next
block's inputs. While a block runs, forward hooks gather its linear layers' input Grams
(:mod:`falcon_prune.loss.layerwise`); the block is then pruned and run again, so that the
next block sees the outputs of the pruned one (the sequential protocol). Only one block's
activations and Grams exist at a time, and only the current block needs to be on the
device: the others stay where the model is (on the CPU).

:class:`Stream` holds the sequences on their way; :func:`capture` catches them at the first
block, and :func:`run_blocks` takes them through every block in turn, with each block's
Grams gathered for the work done on it.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from falcon_prune.analysis.blocks import Blocks, state_key
from falcon_prune.data.batches import Batch, map_tensors, to_device
from falcon_prune.errors import ModelError
from falcon_prune.loss.distributed import Ranks
from falcon_prune.loss.layerwise import Grams

#: keyword arguments of a block call that carry a key/value cache (never used here)
CACHE_KEYS = ("cache", "past_key_value", "past_key_values", "layer_past")


def release_memory() -> None:
    """Hand the memory freed by a block's work back to the system (glibc's
    ``malloc_trim``; elsewhere nothing): the large activations of a block are freed
    between blocks, but an allocator that keeps them would make the process's resident
    memory grow with every block."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _Reached(Exception):
    """Raised by the hook on the first block once its inputs are caught."""


@dataclass
class Stream:
    """The calibration batches on their way through the blocks: for each batch, the hidden
    states entering the current block and the other arguments the model passes every
    block (attention masks, rotary embeddings, positions)."""

    states: list[torch.Tensor]
    args: list[tuple]
    kwargs: list[dict]


def _is_cache(value: object) -> bool:
    """Whether a block's argument is a key/value cache (HuggingFace's ``Cache`` classes,
    told by their ``get_seq_length``; some blocks take it positionally, as GPT-2's)."""
    return callable(getattr(value, "get_seq_length", None))


def _cleaned(kwargs: dict, device: torch.device) -> dict:
    """A block call's keyword arguments without a key/value cache, on ``device``."""
    out = {}
    for key, value in kwargs.items():
        if key in CACHE_KEYS or _is_cache(value):
            value = None
        elif key == "use_cache":
            value = False
        out[key] = map_tensors(value, lambda t: t.detach().to(device))
    return out


def capture(model: nn.Module, blocks: Blocks, batches: list[Batch],
            call: Callable[[nn.Module, object], object], device: torch.device) -> Stream:
    """The inputs of the first block for every batch of model inputs (run by ``call``;
    the model stops there), on ``device``."""
    caught: dict = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if state_key(args, kwargs) == 0:
            caught["state"], caught["args"] = args[0], args[1:]
        else:
            caught["state"], caught["args"] = kwargs.pop("hidden_states"), ()
        caught["kwargs"] = kwargs
        raise _Reached

    stream = Stream([], [], [])
    handle = blocks.modules[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    call(model, to_device(batch, device))
                except _Reached:
                    pass
                else:
                    raise ModelError(f"the model's forward never called {blocks.path}[0]; "
                                     "name the blocks it runs with blocks=...")
                stream.states.append(caught["state"].detach().to(device))
                stream.args.append(tuple(None if _is_cache(a) else map_tensors(
                    a, lambda t: t.to(device)) for a in caught["args"]))
                stream.kwargs.append(_cleaned(caught["kwargs"], device))
    finally:
        handle.remove()
    return stream


def linear_layers(block: nn.Module, prefix: str, names: set[str]) -> dict[str, nn.Module]:
    """{full name: module} of the block's modules whose weight (``<name>.weight``) is one
    of the prunable ``names``."""
    return {f"{prefix}.{n}": m for n, m in block.named_modules()
            if f"{prefix}.{n}.weight" in names}


def _run(block: nn.Module, stream: Stream) -> list[torch.Tensor]:
    """The block's outputs on every batch of the stream."""
    out = []
    with torch.no_grad():
        for i, state in enumerate(stream.states):
            y = block(state, *stream.args[i], **stream.kwargs[i])
            out.append(y if isinstance(y, torch.Tensor) else y[0])
            release_memory()  # the batch's intermediates
    return out


def run_blocks(blocks: Blocks, stream: Stream, layers: Callable[[int, nn.Module], dict],
               work: Callable[[int, nn.Module, Grams], bool], ranks: Ranks,
               device: torch.device, desc: str, progress: bool) -> None:
    """Every block in turn, on ``device``: run it on the stream while the Grams of its
    ``layers(i, block)`` are gathered (summed over the processes), call ``work(i, block,
    grams)``, and advance the stream with the block's outputs (run again when ``work``
    says it changed the block). Each block goes back where it was after its turn."""
    bar = tqdm(total=len(blocks), desc=desc, unit="block", disable=not progress)
    for i, block in enumerate(blocks.modules):
        home = next((p.device for p in block.parameters()), device)
        block.to(device)
        grams = Grams(layers(i, block))
        with grams.attached():
            out = _run(block, stream)
        grams.reduce(ranks)
        if work(i, block, grams):
            out = _run(block, stream)
        stream.states = out
        block.to(home)
        del grams
        release_memory()
        bar.update(1)
    bar.close()
