"""Validating and resolving the settings a user gives ``prune`` and ``gradual``.

Every setting is checked (type and range) with a message that says what to pass; a setting
the method does not use, or that the structure does not take, is refused. :func:`resolve`
applies the given settings over a method's defaults (:mod:`falcon_prune.config`) and
returns the run's :class:`~falcon_prune.config.PruneConfig` with the names the caller chose;
:func:`resolve_gradual` does the same for a
:class:`~falcon_prune.config.GradualConfig`; :func:`resolve_precisions` decides the 'auto'
precisions for the model at hand.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence

import torch

from falcon_prune.config import (
    BN_SAMPLES,
    GRADIENT_PRECISIONS,
    OPTIONAL_SETTINGS,
    GradualConfig,
    PruneConfig,
    defaults,
    gradual_defaults,
)
from falcon_prune.data.tasks import as_task
from falcon_prune.errors import BudgetError, ConfigError, ConfigTypeError
from falcon_prune.loss.planning import check_dtype, check_storage
from falcon_prune.loss.storage import native_bfloat16
from falcon_prune.methods import get_method, method_names
from falcon_prune.methods.options import SolverOptions
from falcon_prune.methods.registry import (
    GRADIENT_SETTINGS,
    HELD_OUT_SETTINGS,
    LAYERWISE_SETTINGS,
    LOSS_MODELS,
    MULTISTAGE_SETTINGS,
    STRUCTURES,
)
from falcon_prune.methods.schedules import DEFAULT_SCHEDULE, Schedule, as_schedule
from falcon_prune.methods.sparsegpt import n_m

#: how layer-wise pruning spreads the budgets over the layers
ALLOCATIONS = ("ilp", "uniform", "owl")


# -- validation ------------------------------------------------------------------------------
def check_fraction(name: str, value: object) -> float | None:
    """A budget fraction in (0, 1] or None (numpy scalars accepted); else the fix."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigTypeError(
            f"{name} must be a number in (0, 1] (the fraction of the dense model to keep) or "
            f"None, got {type(value).__name__} {value!r}")
    v = float(value)
    if math.isnan(v) or not 0 < v <= 1:
        raise BudgetError(
            f"{name}={value!r} is not a fraction in (0, 1]: it is the fraction of the dense "
            f"model to keep (e.g. {name}=0.3 keeps 30 %)")
    return v


def check_device(device: object) -> str:
    """The device as text ('cpu', 'cuda:0'), or a ConfigError that says what is usable."""
    try:
        dev = torch.device(device)  # type: ignore[arg-type]
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device {device!r} is not a torch device (e.g. 'cpu', 'cuda')") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but torch sees no CUDA GPU here; use device='cpu'")
    return str(dev)


def _integer(low: int):
    def check(name: str, v: object) -> int:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {v!r}")
        return int(v)
    return check


def _real(ok, rule: str):
    def check(name: str, v: object) -> float:
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise ConfigTypeError(f"{name} must be a number ({rule}), got {v!r}")
        if math.isnan(float(v)) or not ok(float(v)):
            raise ConfigError(f"{name}={v!r} is out of range: {rule}")
        return float(v)
    return check


def _flag(name: str, v: object) -> bool:
    if not isinstance(v, bool):
        raise ConfigTypeError(f"{name} must be True or False, got {v!r}")
    return v


def _optional(check):
    return lambda name, v: None if v is None else check(name, v)


def _solver(name: str, v: object) -> SolverOptions:
    if not isinstance(v, SolverOptions):
        raise ConfigTypeError(f"{name} must be a falcon_prune.SolverOptions, got {v!r}")
    return v


def _bn(name: str, v: object) -> int:
    if isinstance(v, bool):
        return BN_SAMPLES if v else 0
    return _integer(0)(name, v)


def _selector(name: str, v: object) -> object:
    """A parameter selector: a glob, a module type, a predicate, or a list of them."""
    items = v if isinstance(v, (list, tuple, set, frozenset)) else [v]
    for item in items:
        if not (isinstance(item, (str, type)) or callable(item)):
            raise ConfigTypeError(f"{name} takes parameter or module names (globs), module "
                                  "types, predicates (name, module) -> bool, or lists of "
                                  f"them; got {item!r}")
    return tuple(v) if isinstance(v, (list, set, frozenset)) else v


def _names(name: str, v: object) -> tuple[str, ...]:
    if isinstance(v, str) or not isinstance(v, (list, tuple)) or not all(
            isinstance(x, str) for x in v):
        raise ConfigTypeError(f"{name} must be a list of module names, got {v!r}")
    return tuple(v)


def _pattern(name: str, v: object) -> str:
    """An n:m sparsity pattern such as '2:4' (n kept of every m consecutive inputs)."""
    try:
        n_m(v)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    return v


def _text(name: str, v: object) -> str:
    if not isinstance(v, str) or not v:
        raise ConfigTypeError(f"{name} must be a module path such as 'model.layers', got {v!r}")
    return v


def _choice(options: Sequence):
    def check(name: str, v: object) -> object:
        if v not in options:
            raise ConfigError(f"{name} must be one of {', '.join(map(repr, options))}, got {v!r}")
        return v
    return check


CHECKS = {
    "n_gradients": _integer(1), "samples_per_gradient": _integer(1),
    "n_validation": _integer(0), "seed": _integer(0),
    "ridge": _real(lambda v: 0 < v < math.inf, "> 0, e.g. 1e-3"),
    "alpha": _real(lambda v: 0 <= v < math.inf, ">= 0"),
    "block_size": _optional(_integer(1)), "solver": _solver,
    "resample": _flag, "revive": _flag, "allow_empty_layers": _flag,
    "min_density": _real(lambda v: 0 <= v < 1, "a fraction in [0, 1) of each layer's weights"),
    "recalibrate_bn": _bn, "sampling": _choice((None, "random", "first")),
    "dtype": lambda name, v: check_dtype(v), "storage": lambda name, v: check_storage(v),
    "gradient_precision": _choice(GRADIENT_PRECISIONS),
    "held_out_precision": _choice(GRADIENT_PRECISIONS),
    "memory_limit": _optional(lambda n, v: int(_real(lambda x: x > 0, "> 0 bytes")(n, v))),
    "scratch_dir": _optional(lambda name, v: str(v)),
    "device": lambda name, v: check_device(v), "task": lambda name, v: as_task(v),
    "structure": _choice(STRUCTURES), "obs_rank": _optional(_integer(1)),
    "include": lambda name, v: _selector(name, v), "exclude": lambda name, v: _selector(name, v),
    "flops_of": _choice(("prunable", "model")),
    "round_to": _optional(_integer(1)), "latency_batch": _optional(_integer(1)),
    "latency_tokens": _optional(_integer(1)),
    "keep_layers": lambda name, v: _names(name, v),
    "loss_model": _choice(LOSS_MODELS), "n_calibration": _integer(1),
    "pattern": lambda name, v: _pattern(name, v), "allocation": _choice(ALLOCATIONS),
    "blocks": lambda name, v: _text(name, v), "passes": _choice((1, 2)),
    "attention_units": _choice(("groups", "heads")),
    "damp": _real(lambda v: 0 <= v < math.inf, ">= 0, e.g. 0.01"),
}

def _why(key: str) -> str:
    """Why a method refuses the optional setting ``key``, naming the methods that use it."""
    users = ", ".join(n for n in method_names() if key in get_method(n).uses) or "none"
    if key in MULTISTAGE_SETTINGS:
        return f"it is single-stage (multi-stage methods take it: {users})"
    if key in GRADIENT_SETTINGS:
        return f"it builds no loss model from gradients (methods that do: {users})"
    if key in HELD_OUT_SETTINGS:
        return f"it scores no candidates on held-out samples (methods that do: {users})"
    if key == "solver":
        return f"it has no solver options (methods that do: {users})"
    if key == "obs_rank":
        return f"obs_rank is the rank of falcon's group OBS saliency (used by {users})"
    return f"only {users} use it"


def _check_keys(method: str, settings: dict) -> None:
    names = {f.name for f in dataclasses.fields(PruneConfig)} | {"stages"}
    unknown = sorted(set(settings) - names)
    if unknown:
        import difflib

        hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, names, 1))
                 else k for k in unknown]
        raise ConfigError(f"unknown setting {', '.join(hints)}; the settings are "
                          f"{', '.join(sorted(names))}")
    uses = get_method(method).uses
    unused = [k for k in settings if k in OPTIONAL_SETTINGS and k not in uses]
    if unused:
        raise ConfigError(f"method={method!r} does not use {', '.join(unused)}: {_why(unused[0])}"
                          "; drop it")


#: the refusal of flops_of='model' by the global loss model's channel units
GLOBAL_CHANNELS_FLOPS_OF = ConfigError(
    "structure='channels' with the global loss model counts the FLOP budget on the "
    "prunable layers' MACs (flops_of='prunable'); removing channels also changes the "
    "operations without weights (the layer-wise loss model, loss_model='layerwise', counts "
    "the whole model's)")


def _check_structure(structure: str, method: str, settings: dict) -> None:
    only = [k for k in ("keep_layers", "obs_rank", "round_to", "latency_batch",
                        "latency_tokens", "attention_units") if k in settings]
    if structure == "weights" and only:
        raise ConfigError(f"{', '.join(only)} apply to structure='channels'; drop them or "
                          "pass structure='channels'")
    if structure == "channels":
        bad = [k for k in ("revive", "block_size") if k in settings]
        if bad:
            raise ConfigError(f"structure='channels' does not take {', '.join(bad)}: units "
                              "are removed for good, and the group saliency needs the full "
                              "Hessian model")
        if settings.get("flops_of", "prunable") != "prunable" and \
                settings.get("loss_model") == "global":
            raise GLOBAL_CHANNELS_FLOPS_OF
        if settings.get("allow_empty_layers"):
            raise ConfigError("structure='channels' keeps at least one channel of every "
                              "group (a layer with no channel cannot run); drop "
                              "allow_empty_layers")


def _check_loss_model(method: str, settings: dict) -> None:
    """Refuse a loss model the method cannot run with, and settings of the other loss
    model when one is named; an n:m pattern fixes every layer's density."""
    m = get_method(method)
    loss = settings.get("loss_model")
    if loss is None:
        return
    if loss not in LOSS_MODELS:
        raise ConfigError(f"loss_model must be one of {', '.join(LOSS_MODELS)}, got {loss!r}")
    allowed = (*m.loss_models, "auto") if len(m.loss_models) == 2 else m.loss_models
    if loss not in allowed:
        raise ConfigError(f"method={method!r} runs with loss_model "
                          f"{' or '.join(map(repr, m.loss_models))}, not {loss!r}")
    other = (GRADIENT_SETTINGS + HELD_OUT_SETTINGS + ("solver",) if loss == "layerwise"
             else (*LAYERWISE_SETTINGS, "damp") if loss == "global" else ())
    given = [k for k in settings if k in other and k != "loss_model"]
    if given:
        raise ConfigError(f"{', '.join(given)} belong to the other loss model than "
                          f"loss_model={loss!r}; drop them")


def _check_layerwise(cfg: PruneConfig) -> None:
    """An n:m pattern fixes every layer's density (no allocation); a second pass
    re-allocates by the knapsack."""
    if cfg.pattern is not None and cfg.allocation not in (None, "uniform", "ilp"):
        raise ConfigError(f"pattern={cfg.pattern!r} keeps n of every m weights in every "
                          f"layer: allocation={cfg.allocation!r} has nothing to choose")
    if cfg.passes == 2 and cfg.allocation != "ilp":
        raise ConfigError("passes=2 measures the error curves again and re-allocates with "
                          "allocation='ilp'; pass it or passes=1")


def _schedule(base: PruneConfig, settings: dict) -> Schedule | None:
    """A multi-stage method's schedule from ``schedule`` (a Schedule, a shape name or a
    list of kept fractions) and ``stages``; a named shape gets the default ``min_step``."""
    default = defaults(base.method).schedule or DEFAULT_SCHEDULE
    stages = settings.get("stages")
    if "schedule" not in settings:
        if stages is None or base.schedule is None:
            return base.schedule
        if base.schedule.levels is not None:
            raise ConfigError("stages disagrees with the explicit levels of the schedule")
        return dataclasses.replace(base.schedule, stages=_integer(1)("stages", stages))
    value = settings["schedule"]
    if value is not None and not isinstance(value, (Schedule, str, Sequence)):
        raise ConfigTypeError(f"schedule must be a Schedule, a shape name or a list of kept "
                              f"fractions, got {value!r}")
    try:
        return as_schedule(value, stages, default.stages, default.min_step)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def resolve(method: str | None, config: PruneConfig | None, settings: dict
            ) -> tuple[PruneConfig, frozenset[str]]:
    """The run's config: ``config`` (or the method's defaults) with ``settings`` (keyword
    arguments; None values count as not given) applied, every field validated. Returns it
    and the names of the settings the caller chose."""
    if config is not None and not isinstance(config, PruneConfig):
        raise ConfigTypeError(f"config must be a falcon_prune.PruneConfig, got {config!r}")
    method = method if method is not None else (config.method if config else "falcon")
    settings = {k: v for k, v in settings.items() if v is not None}
    structure = CHECKS["structure"]("structure", settings.get(
        "structure", config.structure if config is not None else "weights"))
    effort = settings.pop("effort", None) if "effort" in get_method(method).uses else None
    if effort is not None and config is not None and config.effort != effort:
        raise ConfigError(f"effort={effort!r} but config.effort={config.effort!r}; give the "
                          "effort in one place (or take the config from defaults(..., effort))")
    base = defaults(method, structure, effort or "default")
    if config is not None:
        if config.method != method:
            raise ConfigError(f"method={method!r} but config.method={config.method!r}; give "
                              "the method in one place")
        if config.structure != structure:
            raise ConfigError(f"structure={structure!r} but config.structure="
                              f"{config.structure!r}; give the structure in one place")
        base = config
    _check_keys(method, settings)
    _check_structure(structure, method, settings)
    _check_loss_model(method, settings)
    given = {f.name for f in dataclasses.fields(PruneConfig)
             if getattr(base, f.name) != getattr(defaults(method, structure, base.effort or
                                                          "default"), f.name)}
    given |= set(settings)
    values = {k: v for k, v in settings.items() if k not in ("schedule", "stages")}
    out = base.replace(**values, schedule=_schedule(base, settings))
    for f in dataclasses.fields(out):
        v = getattr(out, f.name)
        if f.name in CHECKS and v is not None:
            out = dataclasses.replace(out, **{f.name: CHECKS[f.name](f.name, v)})
    if out.task is None:
        out = out.replace(task=as_task(None))
    _check_solver(out)
    _check_layerwise(out)
    return out, frozenset(given)


def _check_solver(cfg: PruneConfig) -> None:
    """Refuse solver options that act on single weights in a run over units."""
    solver = cfg.solver
    if cfg.structure == "channels" and solver is not None and (
            solver.obs_steps > 1 or solver.active_factor is not None):
        raise ConfigError("SolverOptions.obs_steps > 1 and active_factor act on single "
                          "weights; structure='channels' takes obs_steps=1 and "
                          "active_factor=None")


def resolve_precisions(cfg: PruneConfig, model_dtype: torch.dtype) -> PruneConfig:
    """``cfg`` with each 'auto' precision decided for a model of ``model_dtype`` (its own
    floating dtype): 'bfloat16' where ``cfg.device`` multiplies it natively and the model
    is not float64 (a float64 model is pruned in float64), else 'model'. The run reports
    the decided values."""
    fast = native_bfloat16(cfg.device) and model_dtype != torch.float64
    return cfg.replace(**{name: "bfloat16" if fast else "model"
                          for name in ("gradient_precision", "held_out_precision")
                          if getattr(cfg, name) == "auto"})


# -- gradual ---------------------------------------------------------------------------------
OWN = ("schedule", "stages", "epochs_per_stage", "final_epochs", "batch_size", "lr",
       "momentum", "weight_decay", "bn_batches")
NOT_IN_GRADUAL = {"recalibrate_bn": "gradual re-estimates BatchNorm statistics after every "
                                    "step (bn_batches)",
                  "sampling": "each step draws a seeded random subset of train_data"}


def _gradual_schedule(base: Schedule, own: dict) -> Schedule:
    stages = own.get("stages")
    if "schedule" not in own:
        if stages is None:
            return base
        if base.levels is not None:
            raise ConfigError("stages disagrees with the explicit levels of the schedule")
        return dataclasses.replace(base, stages=stages)
    value = own["schedule"]
    if not isinstance(value, (Schedule, str, list, tuple)):
        raise ConfigTypeError(f"schedule must be a Schedule, a shape name or a list of kept "
                              f"fractions, got {value!r}")
    return as_schedule(value, stages)


def resolve_gradual(method: str | None, config: GradualConfig | None, settings: dict
                    ) -> GradualConfig:
    """The run's GradualConfig: ``config`` (or the method's gradual defaults) with the
    keyword ``settings`` applied (gradual's own and the steps'), every one validated."""
    if config is not None and not isinstance(config, GradualConfig):
        raise ConfigTypeError(f"config must be a falcon_prune.GradualConfig, got "
                              f"{config!r}")
    method = method if method is not None else (config.step.method if config else "falcon")
    structure = settings.get("structure") or "weights"
    base = config if config is not None else gradual_defaults(method, structure)
    if config is not None and config.step.method != method:
        raise ConfigError(f"method={method!r} but config.step.method={config.step.method!r}")
    settings = {k: v for k, v in settings.items() if v is not None}
    for k in settings:
        if k in NOT_IN_GRADUAL:
            raise ConfigError(f"gradual does not take {k}: {NOT_IN_GRADUAL[k]}")
    own = {k: settings.pop(k) for k in OWN if k in settings}
    gradual_defaults(method)  # refuses a multi-stage method
    step, _ = resolve(method, base.step, settings)
    out = base.replace(step=step, schedule=_gradual_schedule(base.schedule, own),
                       **{k: v for k, v in own.items() if k not in ("schedule", "stages")})
    for name, low in (("epochs_per_stage", 0), ("final_epochs", 0), ("batch_size", 1),
                      ("bn_batches", 0)):
        v = getattr(out, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {v!r}")
    for name, ok in (("lr", lambda v: v > 0), ("momentum", lambda v: v >= 0),
                     ("weight_decay", lambda v: v >= 0)):
        v = getattr(out, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v):
            raise ConfigError(f"{name} has a bad value {v!r}")
    return out
