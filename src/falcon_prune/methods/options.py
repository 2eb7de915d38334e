"""What a solver is given and what it returns: :class:`SolverOptions` (the IHT solvers'
hyperparameters), :class:`SolverTrace` (what a run did: candidates and seconds per phase)
and :class:`SolverResult` (the chosen weights and support)."""

from __future__ import annotations

import dataclasses
import numbers
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from falcon_prune.errors import ConfigError

STEPS = ("lipschitz", "linesearch")
SALIENCIES = ("magnitude", "obs", "fisher")


@dataclass(frozen=True)
class SolverOptions:
    """Hyperparameters of the IHT solvers (chita, falcon); inputs only (what a run did is
    in its :class:`SolverTrace`).

    ``max_iter`` IHT iterations per round (0: falcon keeps its best warm start);
    ``rounds`` alternations of IHT and back-solve;
    ``step`` 'lipschitz' (1/L from power iteration) or 'linesearch' (backtracking from a
    larger step, accepting only descent); ``tol`` relative change that stops IHT once the
    support is stable; ``active_factor`` restricts IHT to the top (factor x kept) weights by
    |w_bar| (None: all weights). falcon's projection weights v_i^2 by f_i^beta: with
    held-out data beta is chosen from ``cost_exponents`` and the ridge from ``ridges`` by
    held-out loss; otherwise beta = ``cost_exponent``. ``saliencies`` are the weight
    importances the warm starts are built from: 'magnitude' (w^2), 'obs' (the optimal
    brain surgeon saliency w_i^2 / [H^-1]_ii of the quadratic model: the increase of Q when
    w_i alone is removed and the others compensate) and/or 'fisher' (w_i^2 times the
    diagonal of the Fisher: no compensation); each is tried with every exponent. For
    structure='channels' they score whole units (normalised group norm, group OBS, group
    Fisher).
    ``obs_steps`` > 1 adds one more candidate: the OBS warm start of the chosen exponent and
    ridge reached in that many steps, the saliencies recomputed on the shrinking support
    (:func:`obs_steps`); it replaces the one-step start when its held-out loss is lower.
    """

    max_iter: int = 30
    rounds: int = 1
    step: str = "lipschitz"
    step_scale: float = 1000.0
    tol: float = 1e-5
    active_factor: float | None = None
    ridges: tuple[float, ...] = (1e-2, 1e-3, 1e-4)
    cost_exponents: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    cost_exponent: float = 0.5
    saliencies: tuple[str, ...] = ("magnitude",)
    obs_steps: int = 1

    def __post_init__(self) -> None:
        for name in ("ridges", "cost_exponents", "saliencies"):
            v = getattr(self, name)
            if isinstance(v, (list, tuple)):
                object.__setattr__(self, name, tuple(v))
        _check_options(self)

    def replace(self, **changes: object) -> SolverOptions:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def _check_options(o: SolverOptions) -> None:
    def integer(name: str, low: int) -> None:
        v = getattr(o, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ConfigError(f"SolverOptions.{name} must be an integer >= {low}, got {v!r}")

    def number(name: str, ok) -> None:
        v = getattr(o, name)
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not ok(float(v)):
            raise ConfigError(f"SolverOptions.{name} has a bad value {v!r}: {_RULES[name]}")

    integer("max_iter", 0)
    integer("rounds", 1)
    integer("obs_steps", 1)
    if o.step not in STEPS:
        raise ConfigError(f"SolverOptions.step must be one of {STEPS}, got {o.step!r}")
    number("step_scale", lambda v: v >= 1)
    number("tol", lambda v: v >= 0)
    number("cost_exponent", lambda v: 0 <= v <= 1)
    if o.active_factor is not None:
        number("active_factor", lambda v: v >= 1)
    if not isinstance(o.ridges, tuple) or not o.ridges or not all(
            isinstance(r, numbers.Real) and r > 0 for r in o.ridges):
        raise ConfigError(f"SolverOptions.ridges must be positive numbers, got {o.ridges!r}")
    if not isinstance(o.cost_exponents, tuple) or not o.cost_exponents or not all(
            isinstance(b, numbers.Real) and 0 <= b <= 1 for b in o.cost_exponents):
        raise ConfigError(
            f"SolverOptions.cost_exponents must lie in [0, 1], got {o.cost_exponents!r}")
    if not isinstance(o.saliencies, tuple) or not o.saliencies or not set(
            o.saliencies) <= set(SALIENCIES):
        raise ConfigError(f"SolverOptions.saliencies must be a non-empty subset of "
                          f"{SALIENCIES}, got {o.saliencies!r}")


_RULES = {"step_scale": "it must be >= 1", "tol": "it must be >= 0",
          "cost_exponent": "it must lie in [0, 1]",
          "active_factor": "it must be >= 1 (the active set holds that many times the kept "
                           "weights) or None"}


@dataclass
class SolverTrace:
    """What a solver run did: its iterations and candidate scores (``history``), seconds
    per phase (``timings``: 'lipschitz', 'products', 'projection', 'saliency',
    'backsolve', 'held_out', 'obs_steps'), accumulated over every solve it is passed to;
    ``progress`` shows IHT progress bars."""

    progress: bool = False
    history: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


@contextmanager
def timed(trace: SolverTrace, phase: str) -> Iterator[None]:
    """Add the seconds spent in the block to ``trace.timings[phase]``."""
    t = time.perf_counter()
    try:
        yield
    finally:
        trace.timings[phase] = trace.timings.get(phase, 0.0) + time.perf_counter() - t


@dataclass
class SolverResult:
    """A solver's answer: weights ``w`` (p,) over the step's variables and their support
    ``mask`` (p,) bool; ``keep`` the items chosen when they are not single weights (the
    (m,) bool units of structure='channels'; None for weights); the selection's ILP or
    knapsack ``ilp_gap`` and bound; the quadratic ``objective``; for falcon the chosen
    ``ridge``, exponent ``beta``, warm start ``saliency``, ``source`` ('warm start' or
    'iht') and held-out ``score``."""

    w: torch.Tensor
    mask: torch.Tensor
    ilp_gap: float | None = None
    ilp_upper_bound: float | None = None
    iterations: int = 0
    objective: float | None = None
    ridge: float | None = None
    beta: float | None = None
    source: str | None = None
    saliency: str | None = None
    score: float | None = None  # held-out loss of w, when chosen by held-out data
    keep: torch.Tensor | None = None
