"""Methods are registered objects: a solver, the settings it uses, and a schedule.

A :class:`Method` is a *solver* (a function of one step's :class:`Problem` returning a
:class:`~falcon_prune.methods.options.SolverResult`) with what it needs to run: whether it
builds a loss model from gradients, scores candidates on held-out samples, takes
:class:`~falcon_prune.methods.options.SolverOptions`, which structures it supports, and
whether it is *multi-stage* (its budgets follow a schedule of stages, with gradients
recomputed at each: falcon++ is falcon with a multi-stage schedule). The built-in methods
are registered here by :mod:`falcon_prune.methods` through :func:`register_method`, the
same call a user makes to add one; ``prune``, the configuration and the command line list
what is registered.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from falcon_prune.errors import ConfigError, ConfigTypeError
from falcon_prune.methods.options import SolverOptions, SolverResult, SolverTrace

if TYPE_CHECKING:
    from falcon_prune.config import PruneConfig
    from falcon_prune.loss.quadratic import QuadraticModel
    from falcon_prune.spaces.base import Choices, Evaluate

#: the settings of a method with a loss model built from gradients
GRADIENT_SETTINGS = ("n_gradients", "samples_per_gradient", "ridge", "alpha", "block_size",
                     "dtype", "gradient_precision", "storage", "memory_limit", "scratch_dir")
#: the settings of a method that scores candidates on held-out samples
HELD_OUT_SETTINGS = ("n_validation", "held_out_precision")
#: the settings of a multi-stage method
MULTISTAGE_SETTINGS = ("schedule", "stages", "resample", "revive", "effort")
#: the settings of a method with a layer-wise solver (the layer-wise loss model)
LAYERWISE_SETTINGS = ("loss_model", "n_calibration", "pattern", "allocation", "blocks",
                      "passes", "attention_units")
LOSS_MODELS = ("global", "layerwise", "auto")
STRUCTURES = ("weights", "channels")


@dataclass
class Problem:
    """What a solver gets for one step: the step's ``choices`` (its variables and how a
    selection is made under its budgets), the quadratic model ``qm`` (methods with
    gradients; else None), the ``options`` (methods that take them), the ``trace`` to
    record candidates and timings in, ``evaluate(w, selection)`` (the held-out loss;
    methods that use held-out samples, when the data leaves some; else None), and the
    run's ``config``."""

    choices: Choices
    qm: QuadraticModel | None
    options: SolverOptions | None
    trace: SolverTrace
    evaluate: Evaluate | None
    config: PruneConfig


Solver = Callable[[Problem], SolverResult]
#: ``layer_solver(W (r, d), H (d, d) float64, count, pattern, config) -> (Ŵ, kept mask)``:
#: prune one linear layer to ``count`` kept weights (or the n:m ``pattern``) given the Gram
#: H of its inputs (:mod:`falcon_prune.loss.layerwise`)
LayerSolver = Callable[..., tuple]


@dataclass(frozen=True)
class Method:
    """A registered method (see :func:`register_method`)."""

    name: str
    solve: Solver | None = field(repr=False)
    uses: frozenset[str] = frozenset()
    structures: tuple[str, ...] = ("weights",)
    multistage: bool = False
    cost_aware: bool = False
    defaults: Mapping[str, Any] = field(default_factory=dict, repr=False)
    channel_defaults: Mapping[str, Any] = field(default_factory=dict, repr=False)
    summary: str = ""
    builtin: bool = False
    layerwise: LayerSolver | None = field(default=None, repr=False)

    @property
    def loss_models(self) -> tuple[str, ...]:
        """The loss models the method runs with: 'global' (a solver over the whole
        network's choices) and/or 'layerwise' (a layer solver, block by block)."""
        return tuple(m for m, on in (("global", self.solve is not None),
                                     ("layerwise", self.layerwise is not None)) if on)

    @property
    def gradients(self) -> bool:
        """Whether the method builds a loss model from gradients."""
        return "n_gradients" in self.uses

    @property
    def held_out(self) -> bool:
        """Whether the method scores candidates on held-out samples."""
        return "n_validation" in self.uses


_REGISTRY: dict[str, Method] = {}


def register_method(name: str, solve: Solver | None, *, gradients: bool = False,
                    held_out: bool = False, options: bool = False,
                    structures: tuple[str, ...] = ("weights",), multistage: bool = False,
                    cost_aware: bool = False, settings: tuple[str, ...] = (),
                    defaults: Mapping[str, Any] | None = None,
                    channel_defaults: Mapping[str, Any] | None = None,
                    summary: str = "", builtin: bool = False,
                    layerwise: LayerSolver | None = None) -> Method:
    """Register ``solve`` as ``method=name``.

    ``solve(problem)`` gets one step's :class:`Problem` and returns a
    :class:`~falcon_prune.methods.options.SolverResult` whose support fits the step's
    budgets (``problem.choices.select`` and ``prefix`` give such supports). Flags:
    ``gradients`` (build ``problem.qm`` from gradient rows: ``n_gradients`` ... become its
    settings), ``held_out`` (``problem.evaluate`` scores candidates on held-out samples:
    ``n_validation``), ``options`` (``problem.options`` is the ``solver=`` setting),
    ``structures`` it supports ('weights', 'channels'), ``multistage`` (a schedule of
    stages: ``schedule``, ``stages``, ``resample``, ``revive``), ``cost_aware`` (its rule
    weighs MACs, so it can meet a ``latency=`` budget); ``settings``: further
    :class:`~falcon_prune.PruneConfig` fields it uses; ``defaults`` /
    ``channel_defaults``: its default values of them where they differ from
    PruneConfig's; ``layerwise``: a layer solver, with which the method also runs (or only
    runs, when ``solve`` is None) with the layer-wise loss model, one block of a large
    model at a time (settings ``loss_model``, ``n_calibration``, ``pattern``,
    ``allocation``, ``blocks``, ``passes``). A setting the method does not use is refused
    when given. Returns the :class:`Method`; a name already registered is refused (see
    :func:`unregister_method`)."""
    if not isinstance(name, str) or not name:
        raise ConfigTypeError(f"a method's name must be a non-empty string, got {name!r}")
    if solve is None and layerwise is None:
        raise ConfigTypeError(f"method {name!r} needs a solver or a layer solver")
    for what, fn in (("solve", solve), ("layerwise", layerwise)):
        if fn is not None and not callable(fn):
            raise ConfigTypeError(f"{what} must be a function, got {fn!r}")
    if name in _REGISTRY:
        raise ConfigError(f"method {name!r} is registered already; unregister_method it first "
                          "or choose another name")
    bad = [s for s in structures if s not in STRUCTURES]
    if not structures or bad:
        raise ConfigError(f"structures must be a non-empty subset of {STRUCTURES}, got "
                          f"{structures!r}")
    uses = set(settings)
    uses |= set(GRADIENT_SETTINGS) if gradients else set()
    uses |= set(HELD_OUT_SETTINGS) if held_out else set()
    uses |= {"solver"} if options else set()
    uses |= set(MULTISTAGE_SETTINGS) if multistage else set()
    uses |= set(LAYERWISE_SETTINGS) if layerwise is not None else set()
    method = Method(name, solve, frozenset(uses), tuple(structures), multistage, cost_aware,
                    MappingProxyType(dict(defaults or {})),
                    MappingProxyType(dict(channel_defaults or {})), summary, builtin,
                    layerwise)
    _REGISTRY[name] = method
    return method


def unregister_method(name: str) -> None:
    """Remove a method a user registered (the built-in ones stay)."""
    method = get_method(name)
    if method.builtin:
        raise ConfigError(f"{name!r} is a built-in method and stays registered")
    del _REGISTRY[name]


def get_method(name: str) -> Method:
    """The registered method ``name``, or a ConfigError that lists them."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def method_names(structure: str | None = None, multistage: bool | None = None
                 ) -> tuple[str, ...]:
    """The registered methods' names, in registration order; only those that support
    ``structure`` and are (not) ``multistage`` when given."""
    return tuple(m.name for m in _REGISTRY.values()
                 if (structure is None or structure in m.structures)
                 and (multistage is None or m.multistage == multistage))
