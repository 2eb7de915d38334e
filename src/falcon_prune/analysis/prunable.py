"""Which parameters are prunable: the registry of layer types and the selection of one run.

A *prunable weight* is an entry of a prunable parameter. By default those are the weight
matrices of ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d``, ``Linear``, recurrent layers
(``RNN``/``LSTM``/``GRU``: ``weight_ih_l*``, ``weight_hh_l*``), ``nn.MultiheadAttention``'s
input projections (``in_proj_weight``, or ``q/k/v_proj_weight``) and HuggingFace's
``Conv1D``; :func:`register_prunable` adds a module type, and ``include``/``exclude``
(names, types or predicates) change the set for one run. ``Embedding`` tables (a lookup
takes no MACs) and 1-D parameters are not prunable by default. A parameter shared by
several modules (tied) is one prunable weight.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fnmatch import fnmatch

from torch import nn
from torch.nn.utils import prune as torch_prune

from falcon_prune.errors import ConfigTypeError, ModelError

Params = Callable[[nn.Module], list[str]]


def _weight(module: nn.Module) -> list[str]:
    return ["weight"]


def _recurrent(module: nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters(recurse=False)
            if n.startswith("weight_") and p.dim() >= 2]


def _attention(module: nn.Module) -> list[str]:
    return [n for n in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
            if getattr(module, n, None) is not None]


#: module type -> the names of its prunable parameters (see :func:`register_prunable`)
PRUNABLE: dict[type, Params] = {
    **dict.fromkeys((nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                     nn.ConvTranspose3d, nn.Linear), _weight),
    **dict.fromkeys((nn.RNN, nn.LSTM, nn.GRU), _recurrent),
    nn.MultiheadAttention: _attention,
}
#: class names of other libraries' layers that are prunable like a Linear
PRUNABLE_NAMES = {"transformers.pytorch_utils.Conv1D": _weight}


def register_prunable(module_type: type, params: Params | tuple[str, ...] = ("weight",)
                      ) -> None:
    """Make the parameters ``params`` (names, or a function of the module returning them)
    of every module of ``module_type`` prunable by default. Their MACs are read from the
    operations that use them, so no cost rule is needed for layers built from matrix
    products and convolutions."""
    if not isinstance(module_type, type) or not issubclass(module_type, nn.Module):
        raise ConfigTypeError(f"register_prunable needs an nn.Module subclass, got "
                              f"{module_type!r}")
    names = params if callable(params) else (lambda m, names=tuple(params): list(names))
    PRUNABLE[module_type] = names


def _default_params(module: nn.Module) -> list[str]:
    for kind in type(module).__mro__:
        if kind in PRUNABLE:
            return PRUNABLE[kind](module)
        key = f"{kind.__module__}.{kind.__name__}"
        if key in PRUNABLE_NAMES:
            return PRUNABLE_NAMES[key](module)
    return []


@dataclass(frozen=True)
class ExcludedLayer:
    """A weight of a prunable type left dense and outside the budgets, and why."""

    name: str
    kind: str
    weights: int
    reason: str


Selector = str | type | Callable[[str, nn.Module], bool] | Sequence


def matches(selector: Selector | None, name: str, module: nn.Module) -> bool:
    """Whether the parameter ``name`` (full name) of ``module`` is selected: by a glob on
    the parameter's or the module's name, by module type, by a predicate
    ``(name, module) -> bool``, or by any of a list of those."""
    if selector is None:
        return False
    if isinstance(selector, (list, tuple, set, frozenset)):
        return any(matches(s, name, module) for s in selector)
    if isinstance(selector, str):
        return fnmatch(name, selector) or fnmatch(name.rpartition(".")[0], selector)
    if isinstance(selector, type):
        return isinstance(module, selector)
    if callable(selector):
        return bool(selector(name, module))
    raise ConfigTypeError(f"include/exclude take names (globs), module types, predicates "
                          f"(name, module) -> bool or lists of them; got {selector!r}")


def parameter_holders(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """id(parameter) -> every (full name, module, attribute) that holds it."""
    out: dict[int, list] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for attr, p in module._parameters.items():
            if p is not None:
                out.setdefault(id(p), []).append(
                    (f"{mname}.{attr}" if mname else attr, module, attr))
    return out


def masked_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """(full name, module, attribute) of every parameter that carries a
    ``torch.nn.utils.prune`` mask."""
    for mname, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, torch_prune.BasePruningMethod):
                attr = hook._tensor_name
                yield (f"{mname}.{attr}" if mname else attr), module, attr


def _refuse_masked(model: nn.Module) -> None:
    for name, _, _ in masked_parameters(model):
        raise ModelError(f"{name} carries a torch.nn.utils.prune mask; fold it first, e.g. "
                         "with falcon_prune.make_permanent")


def prunable_parameters(model: nn.Module, include: Selector | None = None,
                        exclude: Selector | None = None) -> list[tuple[str, nn.Module, str, tuple]]:
    """[(full name, module, attribute, aliases)] of the prunable parameters, in module
    order: the registered ones and those ``include`` selects, less those ``exclude``
    selects, 2-D or more, each tied parameter once (``aliases``: its other holders)."""
    _refuse_masked(model)
    holders = parameter_holders(model)
    out, seen = [], set()
    for mname, module in model.named_modules():
        registered = set(_default_params(module))
        for attr, p in module._parameters.items():
            name = f"{mname}.{attr}" if mname else attr
            if p is None or p.dim() < 2 or id(p) in seen:
                continue
            if (attr in registered or matches(include, name, module)) and not matches(
                    exclude, name, module):
                seen.add(id(p))
                aliases = tuple((m, a) for n, m, a in holders[id(p)] if n != name)
                out.append((name, module, attr, aliases))
    return out


def prunable_weights(model: nn.Module, include: Selector | None = None,
                     exclude: Selector | None = None
                     ) -> tuple[dict[str, tuple], list[ExcludedLayer]]:
    """({full name: (module, attribute, aliases)} of the prunable parameters, the ones
    left out): a parameter that shares its storage with another parameter object (a copy
    made with ``nn.Parameter(other.data)``, which cannot be pruned consistently) is left
    out; meta-device weights are refused with the fix."""
    found = prunable_parameters(model, include, exclude)
    storage: dict[tuple[int, int], list[str]] = {}
    objects: dict[tuple[int, int], set[int]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.device.type != "meta" and p.numel():
            key = (p.untyped_storage().data_ptr(), p.storage_offset())
            storage.setdefault(key, []).append(name)
            objects.setdefault(key, set()).add(id(p))
    weights, excluded = {}, []
    for name, module, attr, aliases in found:
        w = getattr(module, attr)
        if w.device.type == "meta":
            raise ModelError(
                f"the model is on the meta device ({name} has no data); load its weights "
                "first (e.g. model.to_empty(device='cpu') and load_state_dict)")
        key = (w.untyped_storage().data_ptr(), w.storage_offset())
        if len(objects.get(key, ())) > 1:
            others = [n for n in storage[key] if n != name]
            excluded.append(ExcludedLayer(name, type(module).__name__, w.numel(),
                                          f"shares its storage with {', '.join(others)}"))
            continue
        weights[name] = (module, attr, aliases)
    return weights, excluded
