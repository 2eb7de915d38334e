"""The repeated blocks of a model (a transformer's layers), found from its modules.

Layer-wise pruning runs the calibration data through a model one block at a time. The
blocks are the longest ``nn.ModuleList`` whose modules all have one class (a transformer's
decoder or encoder layers; the first such list in module order when two are as long), or
the list a user names (``blocks="model.layers"``). No table of architectures: the model's
own structure says where its blocks are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from falcon_prune.errors import ConfigError, ModelError


@dataclass
class Blocks:
    """The ``path`` of the blocks' list in the model (``'model.layers'``) and the list."""

    path: str
    modules: nn.ModuleList

    def __len__(self) -> int:
        return len(self.modules)

    def names(self, model: nn.Module) -> list[str]:
        """Each block's module name in ``model``."""
        return [f"{self.path}.{i}" for i in range(len(self.modules))]


def state_key(args: tuple, kwargs: dict) -> int | str:
    """Where a block call carries its hidden states: 0 (the first positional argument) or
    ``'hidden_states'``; ModelError when it has neither."""
    if args:
        return 0
    if "hidden_states" in kwargs:
        return "hidden_states"
    raise ModelError("the first block is called without a positional input or "
                     "hidden_states=...; name the blocks with blocks=...")


def find_blocks(model: nn.Module, path: str | None = None) -> Blocks:
    """The model's repeated blocks: the ``nn.ModuleList`` at ``path``, or the longest list
    of two or more modules that share one class; ModelError when there is none."""
    lists = {name: m for name, m in model.named_modules() if isinstance(m, nn.ModuleList)}
    if path is not None:
        if path not in lists:
            raise ConfigError(f"blocks={path!r} is not an nn.ModuleList of the model; its "
                              f"lists are {sorted(lists) or 'none'}")
        return Blocks(path, lists[path])
    best = None
    for name, m in lists.items():
        if len(m) >= 2 and len({type(x) for x in m}) == 1 and (best is None or len(m) >
                                                                 len(best.modules)):
            best = Blocks(name, m)
    if best is None:
        raise ModelError(
            f"{type(model).__name__} has no repeated blocks (an nn.ModuleList of two or more "
            "modules of one class), which layer-wise pruning runs one at a time; name them "
            "with blocks='path.to.list', or use loss_model='global'")
    return best


def outside(blocks: Blocks):
    """A parameter selector ``(name, module) -> bool`` of everything outside the blocks."""
    prefix = blocks.path + "."

    def selector(name: str, module: nn.Module) -> bool:
        return not name.startswith(prefix)

    selector.__qualname__ = f"outside {blocks.path}"
    return selector


def move_outside(model: nn.Module, blocks: Blocks, device: torch.device) -> None:
    """Move every parameter and buffer of ``model`` that is not inside the blocks to
    ``device`` (the embeddings, final norm and head), leaving the blocks where they are."""
    inside = {id(m) for m in blocks.modules.modules()}
    for module in model.modules():
        if id(module) in inside:
            continue
        for p in module._parameters.values():
            if p is not None and p.device != device:
                p.data = p.data.to(device)  # the same Parameter: ties stay tied
        for key, b in module._buffers.items():
            if b is not None and b.device != device:
                module._buffers[key] = b.to(device)
