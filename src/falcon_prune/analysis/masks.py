"""Masks and copies: the pruned network is a copy of the user's model whose prunable
weights carry ``torch.nn.utils.prune`` masks, so that fine-tuning keeps pruned weights at
zero; :func:`make_permanent` folds them into plain weights."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from falcon_prune.analysis.costs import CostModel
from falcon_prune.analysis.prunable import masked_parameters, parameter_holders


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


# -- masks of a model being trained (gradual) ---------------------------------------------------
def _holders(model: nn.Module, cm: CostModel, suffix: str = ""
             ) -> list[list[tuple[nn.Module, str]]]:
    """Per prunable parameter of ``cm`` (by name), every (module, attribute) of ``model``
    that holds it (a tied parameter has several). With ``suffix="_orig"``: the holders of
    a masked model's ``<attribute>_orig`` parameters, named without the suffix."""
    found = parameter_holders(model)
    by_name = {n: holders for holders in found.values() for n, _, _ in holders}
    return [[(m, a.removesuffix(suffix)) for _, m, a in by_name[lay.name + suffix]]
            for lay in cm.layers]


def attach_masks(model: nn.Module, cm: CostModel) -> None:
    """Give every prunable parameter a ``torch.nn.utils.prune`` mask (its non-zero
    pattern), so that the parameters (``<name>_orig``) stay the same objects all run long
    and tied ones stay tied."""
    for holders in _holders(model, cm):
        module, attr = holders[0]
        mask = getattr(module, attr).detach() != 0
        for module, attr in holders:
            torch_prune.custom_from_mask(module, attr, mask)


def write_back(model: nn.Module, cm: CostModel, w: torch.Tensor, mask: torch.Tensor) -> None:
    """Copy a step's flat weights/mask into the masked training model, in place."""
    with torch.no_grad():
        for wl, ml, holders in zip(cm.split(w), cm.split(mask), _holders(model, cm, "_orig"),
                                   strict=True):
            for module, attr in holders:
                orig, keep = getattr(module, attr + "_orig"), getattr(module, attr + "_mask")
                orig.copy_(wl.to(orig.dtype))
                keep.copy_(ml.to(keep.dtype))


def attach_param_masks(model: nn.Module, masks: dict[str, tuple[torch.Tensor, torch.Tensor]]
                       ) -> None:
    """Give the parameters of ``masks`` {name: (kept entries, values)} (the biases and norms
    of channel units) masks that keep every entry."""
    modules = dict(model.named_modules())
    for name, (keep, _) in masks.items():
        mname, _, pname = name.rpartition(".")
        if not hasattr(modules[mname], pname + "_mask"):
            torch_prune.custom_from_mask(modules[mname], pname, torch.ones_like(keep))


def mask_params(model: nn.Module, masks: dict[str, tuple[torch.Tensor, torch.Tensor]]
                ) -> None:
    """Mask (``torch.nn.utils.prune``) parameters other than the prunable weights with
    ``masks`` {name: (kept entries (bool), values)}, e.g. the biases and norms of removed
    channels in a training model, so that fine-tuning keeps them at zero."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, (keep, value) in masks.items():
            mname, _, pname = name.rpartition(".")
            module = modules[mname]
            if not hasattr(module, pname + "_mask"):
                torch_prune.custom_from_mask(module, pname, torch.ones_like(keep))
            getattr(module, pname + "_orig").copy_(value.to(module.weight.device))
            getattr(module, pname + "_mask").copy_(keep.to(getattr(module, pname + "_mask")))
