"""The public facade: ``prune(model, data, flops=..., nnz=..., method=...)`` and
``count_macs``. The work happens in :mod:`falcon_prune.runs.oneshot`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from falcon_prune.analysis.blocks import find_blocks, outside
from falcon_prune.analysis.masks import plain_copy
from falcon_prune.analysis.recount import recount
from falcon_prune.config import PruneConfig
from falcon_prune.data.tasks import Task, as_task
from falcon_prune.errors import BudgetError, ConfigError, ModelError
from falcon_prune.loss.distributed import Ranks
from falcon_prune.methods import get_method, method_names
from falcon_prune.results import PruneResult
from falcon_prune.runs import layerwise, oneshot, structured
from falcon_prune.runs.setup import check_model
from falcon_prune.settings import GLOBAL_CHANNELS_FLOPS_OF, check_fraction, resolve


def _rng_devices(device: str) -> list[int]:
    dev = torch.device(device)
    return [dev.index if dev.index is not None else torch.cuda.current_device()] \
        if dev.type == "cuda" else []


def prune(
    model: nn.Module,
    data: object,
    flops: float | None = None,
    nnz: float | None = None,
    method: str | None = None,
    *,
    task: Task | str | Any = None,
    config: PruneConfig | None = None,
    seed: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    latency: float | None = None,
    **settings: Any,
) -> PruneResult:
    """Prune a copy of ``model`` so that it keeps at most ``flops`` of the dense
    multiply-accumulates and at most ``nnz`` of the weights of its prunable layers (kept
    fractions in (0, 1]; at least one budget). The model is never modified.

    ``data``: tensors ((inputs, targets), a tensor, a dict of tensors), a Dataset, a list
    of samples, a DataLoader or an iterable of batches; batches may be tuples or dicts
    (a HuggingFace ``BatchEncoding`` included), inputs may be integer token ids.
    ``method``: a registered method (:data:`~falcon_prune.METHODS`): 'mp', 'mp_flops',
    'woodfisher', 'chita', 'falcon' (default), 'falcon++', or one added with
    :func:`~falcon_prune.methods.register_method`.
    ``task``: how a batch runs through the model and its per-sample loss: a
    :class:`~falcon_prune.Task`, a built-in name ('classification' (default),
    'binary_classification', 'regression', 'language_modeling', 'dense_prediction') or a
    loss function ``(prediction, targets) -> per-sample losses``.
    ``seed`` and ``sampling`` decide which samples are used; ``device`` where gradients and
    solvers run (and where the pruned copy lives).

    ``settings`` are fields of :class:`~falcon_prune.PruneConfig` (``n_gradients``,
    ``n_validation``, ``ridge``, ``alpha``, ``solver``, ``schedule``, ``stages``,
    ``min_density``, ``recalibrate_bn``, ``storage``, ...), applied over ``config`` or the
    method's defaults (:func:`~falcon_prune.defaults`); a setting the method does not use
    is refused. ``result.config`` holds every setting actually used.

    ``latency`` (structure='channels'; alone or with ``flops``, not with ``nnz``): the kept fraction
    of the network's time per forward at ``latency_batch`` samples on ``device``, predicted
    from a lookup table of layer times measured on this machine
    (:mod:`falcon_prune.analysis.timing`); with the layer-wise loss model (a language
    model's heads and MLP channels), of the model's time at ``latency_batch`` sequences of
    ``latency_tokens`` tokens, from measured block times
    (:mod:`falcon_prune.analysis.site_timing`). ``result.details['latency']`` has the
    prediction and the pruned network's time measured against the dense one (reported, not
    certified: timings differ between runs, so a latency budget is not deterministic
    either).

    Raises a :class:`~falcon_prune.errors.FalconPruneError` subclass (also a ValueError,
    TypeError or MemoryError) for bad input, before any expensive work where it can be
    told; the returned network never exceeds a budget (checked by an independent recount).
    """
    flops = check_fraction("flops", flops)
    nnz = check_fraction("nnz", nnz)
    latency = check_fraction("latency", latency)
    run = {k: v for k, v in (("task", task), ("seed", seed), ("device", device))
           if v is not None}
    cfg, given = resolve(method, config, {**settings, **run})
    cfg = _latency_settings(cfg, nnz, latency)
    check_model(model)
    cfg = _language_model_layers(model, cfg)
    note = None
    if cfg.loss_model is not None:
        cfg, note = layerwise.choose_loss_model(model, cfg, given)
    _latency_runner(cfg, latency)
    if cfg.structure == "channels" and cfg.loss_model != "layerwise" and \
            cfg.flops_of != "prunable":
        raise GLOBAL_CHANNELS_FLOPS_OF
    with torch.random.fork_rng(devices=_rng_devices(cfg.device)):
        if cfg.loss_model == "layerwise" and cfg.structure == "channels":
            result = structured.run(model, data, flops, nnz, cfg, given, progress, latency)
        elif cfg.loss_model == "layerwise":
            result = layerwise.run(model, data, flops, nnz, cfg, given, progress)
        else:
            result = oneshot.run(model, data, flops, nnz, cfg, given, progress, latency)
    if note is not None:
        result.details["loss_model_choice"] = note
    return result


def _language_model_layers(model: nn.Module, cfg: PruneConfig) -> PruneConfig:
    """A language model's prunable set defaults to the linear layers of its repeated
    blocks (embeddings and the often tied output head stay dense), unless include= or
    exclude= say otherwise."""
    if cfg.task.name != "language_modeling" or cfg.include is not None or (
            cfg.exclude is not None):
        return cfg
    try:
        blocks = find_blocks(model, cfg.blocks)
    except (ConfigError, ModelError):
        return cfg
    return cfg.replace(exclude=outside(blocks))


def _latency_settings(cfg: PruneConfig, nnz: float | None,
                      latency: float | None) -> PruneConfig:
    """Refuse a latency budget where it cannot apply; resolve ``latency_batch`` (1) and
    ``round_to`` (4; ``round_to=1`` allows every channel count) when a latency budget is
    given without them."""
    if latency is None:
        if cfg.latency_batch is not None:
            raise ConfigError("latency_batch is the batch size of a latency budget; give "
                              "latency=<fraction kept> too, or drop it")
        return cfg
    if cfg.structure != "channels":
        raise ConfigError("latency= budgets need structure='channels': a network with "
                          "masked weights runs at the dense speed")
    if Ranks.current().active:
        raise ConfigError("a latency= budget is measured in one process; run it without "
                          "torchrun (or drop latency=)")
    if nnz is not None:
        raise BudgetError("give nnz= or latency=, not both")
    return cfg.replace(latency_batch=cfg.latency_batch or 1, round_to=cfg.round_to or 4)


def _latency_runner(cfg: PruneConfig, latency: float | None) -> None:
    """Refuse what the run chosen for a latency budget cannot honour: the global loss
    model's channel units need a cost-aware method and take no ``latency_tokens``; the
    layer-wise run's allocation (knapsack or one fraction) meets it for every method."""
    if cfg.latency_tokens is not None and latency is None:
        raise ConfigError("latency_tokens is the sequence length of a latency budget; give "
                          "latency=<fraction kept> too, or drop it")
    if latency is None or cfg.loss_model == "layerwise":
        return
    if cfg.latency_tokens is not None:
        raise ConfigError("latency_tokens is the sequence length a language model's blocks "
                          "are timed at (the layer-wise loss model); the global loss model "
                          "times the whole network on latency_batch samples: drop it")
    if not get_method(cfg.method).cost_aware:
        able = [m for m in method_names("channels") if get_method(m).cost_aware]
        raise ConfigError(f"latency= budgets are met by {', '.join(able)}, not "
                          f"{cfg.method!r} (its rule ignores costs)")


def count_macs(model: nn.Module, inputs: object, task: Task | str | None = None
               ) -> tuple[float, float]:
    """(kept, dense) multiply-accumulates per sample of the prunable weights of ``model``
    on a batch of model ``inputs`` (run as ``task.call`` says), a weight entry counting as
    kept when it is non-zero: the independent recount (:mod:`falcon_prune.analysis.recount`) every
    result is checked with. The model is not modified (masks are folded in a copy)."""
    t = as_task(task)
    count = recount(plain_copy(model).eval(), inputs, t.call)
    if count.uncounted:
        name, op = next(iter(count.uncounted.items()))
        raise ModelError(f"{name} is read by {op}, which has no FLOP formula; its "
                         "MACs cannot be counted")
    return count.kept, count.dense
