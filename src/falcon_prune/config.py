"""Typed, frozen configuration of a pruning run, and each method's defaults.

:class:`PruneConfig` holds every setting that changes what ``prune`` computes. Each method
has its defaults (:func:`defaults`; the single-stage table and falcon++'s sit side by side
in :data:`DEFAULTS`). A setting that a method does not use is ``None`` in its config, and
passing one is refused rather than silently ignored. ``prune`` returns the config it
actually used (with the sampling chosen, the held-out count clipped to the data, ...) in
``result.config``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from falcon_prune.errors import BudgetError, ConfigError, ConfigTypeError
from falcon_prune.schedules import Schedule, as_schedule
from falcon_prune.solvers import SolverOptions
from falcon_prune.storage import check_dtype, check_storage, native_bfloat16
from falcon_prune.tasks import Task, as_task

METHODS = ("mp", "mp_flops", "woodfisher", "chita", "falcon", "falcon++")
GRADIENT_METHODS = ("woodfisher", "chita", "falcon", "falcon++")
STRUCTURES = ("weights", "channels")
GRADIENT_PRECISIONS = ("model", "bfloat16", "auto")
#: the methods that choose channel units (structure='channels')
CHANNEL_METHODS = ("mp", "mp_flops", "falcon", "falcon++")
#: samples whose BatchNorm statistics ``recalibrate_bn=True`` re-estimates
BN_SAMPLES = 1000


@dataclass(frozen=True)
class PruneConfig:
    """Every setting of a pruning run (see docs/api.md for each one).

    - ``method``, ``task`` (how the model is run and its loss), ``seed``, ``device``.
    - Gradients (methods with a loss model): ``n_gradients`` rows of X, each the
      gradient of ``samples_per_gradient`` samples, computed in ``gradient_precision``
      ('model': the working copy's own dtype; 'bfloat16': model, inputs and backward in
      bfloat16, the rows stored as ``dtype``; 'auto': bfloat16 where ``device`` multiplies
      it in hardware and the model is not float64, else 'model', decided when the run
      starts and reported in the result's config); ``ridge`` and ``alpha`` of the
      quadratic model; ``block_size`` (block-diagonal Hessian); X's storage ``dtype``,
      ``storage`` ('auto', 'memory', 'disk'), ``memory_limit`` (bytes), ``scratch_dir``.
    - ``n_validation`` held-out samples that falcon/falcon++ choose hyperparameters on,
      scored in ``held_out_precision`` ('model', 'bfloat16' or 'auto', as for the rows).
    - ``solver``: :class:`~falcon_prune.solvers.SolverOptions` (chita, falcon, falcon++).
    - falcon++: ``schedule``, ``resample`` (new gradient samples at every stage),
      ``revive`` (let later stages bring pruned weights back).
    - Every method: ``min_density`` (each layer keeps at least this fraction of its
      weights), ``allow_empty_layers`` (let a layer lose every weight; by default each
      keeps at least one), ``recalibrate_bn`` (re-estimate BatchNorm statistics on that
      many samples after pruning; 0: keep them), ``sampling`` ('random', 'first', or None:
      random where the data allows), ``structure``: 'weights' (unstructured masks) or
      'channels' (whole coupled channels removed: a physically smaller network);
      ``include``/``exclude`` (parameter or module names as globs, module types, or
      predicates ``(name, module) -> bool``, or lists of them) change which parameters
      are prunable; ``flops_of``: 'prunable' (the FLOP budget is a fraction of the
      prunable parameters' MACs) or 'model' (of the whole network's, fixed MACs
      included).
    - structure='channels': ``keep_layers`` (modules whose output channels stay whole,
      besides the output layers), ``obs_rank`` (leading eigen-directions of the Fisher
      the group OBS saliency uses; None: all n), ``round_to`` (every group keeps a
      multiple of this many channels, or all: CPU and GPU kernels run faster on such
      counts; 4 by default with a ``latency=`` budget), ``latency_batch`` (the batch size
      a ``latency=`` budget is measured at; 1 when a latency budget is given without it,
      None without one).

    - falcon++: ``effort``, the named preset the defaults came from ('default'; 'best',
      the most accurate in about 2.5 times the time; 'fast', about 0.4 times: see
      :data:`EFFORTS`); settings given beside it are applied over the preset.

    A field the method does not use is None."""

    method: str = "falcon"
    task: Task | None = None
    seed: int = 0
    device: str = "cpu"
    n_gradients: int | None = 1000
    samples_per_gradient: int | None = 1
    n_validation: int | None = 1000
    ridge: float | None = 1e-3
    alpha: float | None = 0.0
    block_size: int | None = None
    solver: SolverOptions | None = SolverOptions()
    schedule: Schedule | None = None
    resample: bool | None = None
    revive: bool | None = None
    min_density: float = 0.0
    allow_empty_layers: bool = False
    recalibrate_bn: int = 0
    sampling: str | None = None
    dtype: torch.dtype | None = torch.float32
    gradient_precision: str | None = "model"
    held_out_precision: str | None = "model"
    storage: str | None = "auto"
    memory_limit: int | None = None
    scratch_dir: str | None = None
    structure: str = "weights"
    include: Any = None
    exclude: Any = None
    flops_of: str = "prunable"
    keep_layers: tuple[str, ...] | None = None
    obs_rank: int | None = None
    round_to: int | None = None
    latency_batch: int | None = None
    effort: str | None = None

    def replace(self, **changes: Any) -> PruneConfig:
        """A copy with some settings changed (validated by ``prune``)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-ready settings (the task by name, dtypes and schedules as text)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Task):
                v = v.name
            elif f.name in ("include", "exclude") and v is not None:
                v = _describe(v)
            elif isinstance(v, torch.dtype):
                v = str(v).replace("torch.", "")
            elif isinstance(v, (SolverOptions, Schedule)):
                v = {k: list(x) if isinstance(x, tuple) else x
                     for k, x in dataclasses.asdict(v).items()}
            out[f.name] = v
        return out


#: which methods use each setting that not every method uses
USED_BY: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("n_gradients", "samples_per_gradient", "ridge", "alpha", "block_size",
                     "dtype", "gradient_precision", "storage", "memory_limit", "scratch_dir"),
                    GRADIENT_METHODS),
    **dict.fromkeys(("n_validation", "held_out_precision"), ("falcon", "falcon++")),
    "solver": ("chita", "falcon", "falcon++"),
    **dict.fromkeys(("schedule", "stages", "resample", "revive", "effort"), ("falcon++",)),
}

MULTISTAGE_SOLVER = SolverOptions(max_iter=0, ridges=(1e-4,), cost_exponents=(0.25, 0.5, 0.75),
                                  saliencies=("magnitude",))


def _table() -> dict[str, PruneConfig]:
    """Each method's defaults: the single-stage ones beside falcon++'s (chosen on a
    validation split of the CIFAR-10 training images; docs/tuning.md)."""
    unused = {k: None for k in USED_BY if k != "stages"}
    out = {}
    for m in METHODS:
        base = PruneConfig(method=m)
        out[m] = base.replace(**{k: v for k, v in unused.items() if m not in USED_BY[k]})
    out["falcon++"] = out["falcon++"].replace(
        samples_per_gradient=2, n_validation=1000, alpha=0.01, solver=MULTISTAGE_SOLVER,
        schedule=Schedule(8, "cubic", min_step=0.01), resample=True, revive=False,
        gradient_precision="auto", held_out_precision="auto", effort="default")
    return out


DEFAULTS: dict[str, PruneConfig] = _table()

# the defaults before tuning round 16: 12 stages, OBS warm starts, 500 held-out samples,
# rows and scores in the model's precision
_OBS_12 = {"schedule": Schedule(12, "cubic", min_step=0.01), "n_validation": 500,
           "gradient_precision": "model", "held_out_precision": "model",
           "solver": MULTISTAGE_SOLVER.replace(saliencies=("obs",))}

#: falcon++'s named presets of stages and gradients: the changes to its defaults
#: (docs/tuning.md has the validation runs that chose them and their cost in units).
#: The default: 8 cubic stages of 1,000 two-sample rows, magnitude warm starts, 1,000
#: held-out samples, rows and scores in bfloat16 where the hardware has it (round 16);
#: 'fast': 6 stages of 500 rows and 500 held-out samples (round 17).
EFFORTS: dict[str, dict[str, Any]] = {
    "default": {},
    "best": _OBS_12,
    "fast": {"schedule": Schedule(6, "cubic", min_step=0.01), "n_gradients": 500,
             "n_validation": 500},
}


def _channel_table() -> dict[str, PruneConfig]:
    """structure='channels' defaults: warm starts from group magnitude and group OBS."""
    out = {}
    for m in CHANNEL_METHODS:
        cfg = DEFAULTS[m].replace(structure="channels", keep_layers=())
        if m == "falcon":
            cfg = cfg.replace(solver=SolverOptions(max_iter=0, saliencies=(
                "magnitude", "obs", "fisher")), obs_rank=256, n_gradients=500, n_validation=500)
        if m == "falcon++":  # tuning round 'channels 1' on the validation split
            cfg = cfg.replace(solver=MULTISTAGE_SOLVER.replace(saliencies=(
                "magnitude", "obs", "fisher")), obs_rank=256, revive=None, n_gradients=500,
                samples_per_gradient=1, schedule=Schedule(4, "cubic", min_step=0.01),
                n_validation=500, gradient_precision="model", held_out_precision="model",
                effort="default")
        out[m] = cfg
    return out


CHANNEL_DEFAULTS: dict[str, PruneConfig] = _channel_table()


def defaults(method: str = "falcon", structure: str = "weights",
             effort: str = "default") -> PruneConfig:
    """The default :class:`PruneConfig` of ``method`` (for ``structure`` 'weights' or
    'channels'); for falcon++, ``effort`` names a preset of :data:`EFFORTS`."""
    if effort != "default":
        if effort not in EFFORTS:
            raise ConfigError(f"effort must be one of {', '.join(EFFORTS)}, got {effort!r}")
        if method != "falcon++" or structure != "weights":
            raise ConfigError(f"effort={effort!r} is a preset of falcon++ with "
                              "structure='weights'; drop it")
        return DEFAULTS[method].replace(effort=effort, **EFFORTS[effort])
    if method not in DEFAULTS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if structure not in STRUCTURES:
        raise ConfigError(f"structure must be one of {STRUCTURES}, got {structure!r}")
    if structure == "channels":
        if method not in CHANNEL_DEFAULTS:
            raise ConfigError(f"structure='channels' supports {', '.join(CHANNEL_METHODS)}; "
                              f"{method!r} chooses single weights only")
        return CHANNEL_DEFAULTS[method]
    return DEFAULTS[method]


def multistage_options(**changes: Any) -> SolverOptions:
    """falcon++'s default :class:`SolverOptions` with ``changes`` applied, e.g.
    ``multistage_options(ridges=(1e-3,))`` to change one choice and keep the others."""
    return MULTISTAGE_SOLVER.replace(**changes)


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


def _describe(v: object) -> object:
    """A JSON-ready description of a selector."""
    if isinstance(v, (list, tuple, set, frozenset)):
        return [_describe(x) for x in v]
    if isinstance(v, type):
        return f"type {v.__module__}.{v.__qualname__}"
    if isinstance(v, str):
        return v
    return f"function {getattr(v, '__qualname__', repr(v))}"


def _names(name: str, v: object) -> tuple[str, ...]:
    if isinstance(v, str) or not isinstance(v, (list, tuple)) or not all(
            isinstance(x, str) for x in v):
        raise ConfigTypeError(f"{name} must be a list of module names, got {v!r}")
    return tuple(v)


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
    "keep_layers": lambda name, v: _names(name, v),
}

_WHY_UNUSED = {
    "n_gradients": "it builds no loss model from gradients",
    "n_validation": "only falcon and falcon++ choose hyperparameters on held-out samples",
    "held_out_precision": "only falcon and falcon++ score candidates on held-out samples",
    "solver": "only chita, falcon and falcon++ have solver options",
    "schedule": "it is single-stage (use method='falcon++' for stages)",
}


def _why(key: str) -> str:
    if key in ("schedule", "stages", "resample", "revive", "effort"):
        return _WHY_UNUSED["schedule"]
    return _WHY_UNUSED.get(key, _WHY_UNUSED["n_gradients"])


def _check_keys(method: str, settings: dict) -> None:
    names = {f.name for f in dataclasses.fields(PruneConfig)} | {"stages"}
    unknown = sorted(set(settings) - names)
    if unknown:
        import difflib

        hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, names, 1))
                 else k for k in unknown]
        raise ConfigError(f"unknown setting {', '.join(hints)}; the settings are "
                          f"{', '.join(sorted(names))}")
    unused = [k for k in settings if k in USED_BY and method not in USED_BY[k]]
    if unused:
        raise ConfigError(f"method={method!r} does not use {', '.join(unused)}: {_why(unused[0])}"
                          "; drop it")


def _check_structure(structure: str, method: str, settings: dict) -> None:
    only = [k for k in ("keep_layers", "obs_rank", "round_to", "latency_batch")
            if k in settings]
    if structure == "weights" and only:
        raise ConfigError(f"{', '.join(only)} apply to structure='channels'; drop them or "
                          "pass structure='channels'")
    if structure == "channels":
        bad = [k for k in ("revive", "block_size") if k in settings]
        if bad:
            raise ConfigError(f"structure='channels' does not take {', '.join(bad)}: units "
                              "are removed for good, and the group saliency needs the full "
                              "Hessian model")
        if settings.get("flops_of", "prunable") != "prunable":
            raise ConfigError("structure='channels' counts the FLOP budget on the prunable "
                              "layers' MACs (flops_of='prunable'); removing channels also "
                              "changes the operations without weights")
        if settings.get("allow_empty_layers"):
            raise ConfigError("structure='channels' keeps at least one channel of every "
                              "group (a layer with no channel cannot run); drop "
                              "allow_empty_layers")
        if "obs_rank" in settings and method not in ("falcon", "falcon++"):
            raise ConfigError(f"obs_rank is the rank of falcon's group OBS saliency; "
                              f"method={method!r} does not use it")


def _schedule(base: PruneConfig, settings: dict) -> Schedule | None:
    """falcon++'s schedule from ``schedule`` (a Schedule, a shape name or a list of kept
    fractions) and ``stages``; a named shape gets the default ``min_step``."""
    default = DEFAULTS["falcon++"].schedule
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
    effort = settings.pop("effort", None) if method == "falcon++" else None
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
    return out, frozenset(given)


def resolve_precisions(cfg: PruneConfig, model_dtype: torch.dtype) -> PruneConfig:
    """``cfg`` with each 'auto' precision decided for a model of ``model_dtype`` (its own
    floating dtype): 'bfloat16' where ``cfg.device`` multiplies it natively and the model
    is not float64 (a float64 model is pruned in float64), else 'model'. The run reports
    the decided values."""
    fast = native_bfloat16(cfg.device) and model_dtype != torch.float64
    return cfg.replace(**{name: "bfloat16" if fast else "model"
                          for name in ("gradient_precision", "held_out_precision")
                          if getattr(cfg, name) == "auto"})
