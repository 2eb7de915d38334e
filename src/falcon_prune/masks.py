"""Masks and copies: the pruned network is a copy of the user's model whose prunable
weights carry ``torch.nn.utils.prune`` masks, so that fine-tuning keeps pruned weights at
zero; :func:`make_permanent` folds them into plain weights."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from falcon_prune.costs import CostModel, masked_parameters


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold every ``torch.nn.utils.prune`` mask into a plain ``weight`` parameter (in place);
    returns the model."""
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, torch_prune.BasePruningMethod):
                torch_prune.remove(module, hook._tensor_name)
    return model


def clone_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that also works when it carries ``torch.nn.utils.prune``
    masks (whose computed ``weight`` tensors refuse deepcopy); ``model`` is left as it was."""
    stash = []
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, torch_prune.BasePruningMethod):
                name = hook._tensor_name
                stash.append((module, name, getattr(module, name)))
                setattr(module, name, getattr(module, name).detach())
    try:
        return copy.deepcopy(model)
    finally:
        for module, name, value in stash:
            setattr(module, name, value)


def plain_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every mask folded into plain weights."""
    return make_permanent(clone_model(model))


def write_weights(cm: CostModel, w: torch.Tensor) -> None:
    """Copy flat weights ``w`` (p,) into the (plain, unmasked) prunable parameters."""
    with torch.no_grad():
        for lay, wl in zip(cm.layers, cm.split(w), strict=True):
            lay.tensor.copy_(wl.to(lay.tensor.dtype))


def apply_weights(cost_model: CostModel, w: torch.Tensor, mask: torch.Tensor) -> None:
    """Write flat weights ``w`` (p,) into the prunable parameters and attach ``mask`` (p,)
    bool as ``torch.nn.utils.prune`` masks (on every holder of a tied parameter, which
    stays tied), so fine-tuning keeps pruned weights at zero."""
    for lay, wl, ml in zip(cost_model.layers, cost_model.split(w), cost_model.split(mask),
                           strict=True):
        with torch.no_grad():
            lay.tensor.copy_(wl.to(lay.tensor.dtype) * ml)
        ml = ml.to(lay.tensor.device)
        for module, attr in lay.holders:
            torch_prune.custom_from_mask(module, attr, ml)


def masks_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """{parameter name: bool mask} of every parameter that carries a
    ``torch.nn.utils.prune`` mask (e.g. ``"conv1.weight"``)."""
    return {name: getattr(module, attr + "_mask").detach().bool().clone()
            for name, module, attr in masked_parameters(model)}
