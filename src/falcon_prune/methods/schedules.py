"""Budget schedules for multi-stage (FALCON++) and gradual pruning (docs/method.md).

A schedule turns a target kept fraction F (of FLOPs or of weights) into the kept fractions
of T stages, non-increasing and ending exactly at F. With u running over the stages from
0 (first) to 1 (last) and k0 the first stage's kept fraction:

- ``linear``:       k(u) = k0 + (F - k0) u
- ``cubic``:        k(u) = F + (k0 - F) (1 - u)^3   (gradual magnitude pruning's polynomial
  schedule: big steps first, small ones near the target)
- ``exponential``:  k(u) = k0 (F / k0)^u            (a constant ratio between stages)

``start`` is k0, the first stage's kept fraction; by default the first stage is where the
shape puts it on the way from the dense model, i.e. u runs over 1/T, 2/T, ..., 1 from a
virtual stage 0 at k0 = 1. An explicit list of kept fractions is also accepted.

``min_step`` (a fraction of the dense model) merges stages that would prune less than that
into the next one: the cubic shape's last steps are tiny (the last of 12 stages towards 20 %
removes 0.05 % of the FLOPs), and every stage costs a full solve.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from falcon_prune.errors import ConfigError, ConfigTypeError

KINDS = ("linear", "cubic", "exponential")


@dataclass(frozen=True)
class Schedule:
    """``stages`` >= 1 stages of shape ``kind`` (see the module doc) starting at the kept
    fraction ``start`` (None: from the dense model), or explicit ``levels`` (kept fractions
    per stage, non-increasing, the last one equal to or below the target). Stages that
    would prune less than ``min_step`` (of the dense model) are merged into the next
    (:func:`stage_budgets`), so a plan may have fewer stages than ``stages``."""

    stages: int = 5
    kind: str = "cubic"
    start: float | None = None
    levels: tuple[float, ...] | None = None
    min_step: float = 0.0

    def __post_init__(self) -> None:
        if (isinstance(self.min_step, bool) or not isinstance(self.min_step, (int, float))
                or math.isnan(self.min_step) or not 0 <= self.min_step < 1):
            raise ConfigError(
                f"min_step={self.min_step!r} must be a fraction in [0, 1) of the dense model"
            )
        if self.levels is not None:
            try:
                levels = tuple(float(v) for v in self.levels)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"schedule levels must be kept fractions (numbers), got "
                                  f"{self.levels!r}") from e
            if not levels:
                raise ConfigError("an explicit schedule needs at least one level")
            for v in levels:
                if math.isnan(v) or not 0 < v <= 1:
                    raise ConfigError(f"schedule level {v!r} is not a kept fraction in (0, 1]")
            if any(b > a + 1e-12 for a, b in zip(levels, levels[1:], strict=False)):
                raise ConfigError(
                    f"schedule levels {levels} increase; kept fractions must be non-increasing "
                    "(pruned weights are not revived)"
                )
            object.__setattr__(self, "levels", levels)
            return
        if isinstance(self.stages, bool) or not isinstance(self.stages, int) or self.stages < 1:
            raise ConfigError(f"stages must be a positive integer, got {self.stages!r}")
        if self.kind not in KINDS:
            raise ConfigError(f"unknown schedule {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.start is not None and (math.isnan(self.start) or not 0 < self.start <= 1):
            raise ConfigError(f"start={self.start!r} must be a kept fraction in (0, 1]")

    @property
    def num_stages(self) -> int:
        return len(self.levels) if self.levels is not None else self.stages

    def fractions(self, target: float) -> list[float]:
        """Kept fractions of every stage for the final ``target`` in (0, 1]; the last is the
        target. Raises when an explicit schedule ends above the target or ``start`` is
        below it."""
        if self.levels is not None:
            if self.levels[-1] > target + 1e-12:
                raise ConfigError(
                    f"the schedule ends at {self.levels[-1]} kept, above the target {target}; "
                    "its last level must reach the target"
                )
            return [max(v, target) for v in self.levels[:-1]] + [target]
        T = self.stages
        if self.start is not None and self.start < target - 1e-12:
            raise ConfigError(
                f"schedule start {self.start} is below the target {target}: the first stage "
                "would prune more than the last; give start >= target"
            )
        if self.start is None:
            k0, us = 1.0, [t / T for t in range(1, T + 1)]
        else:
            k0 = self.start
            us = [0.0] if T == 1 else [t / (T - 1) for t in range(T)]
            if T == 1:
                return [target]
        out = [_shape(self.kind, k0, target, u) for u in us]
        out[-1] = target
        return [max(v, target) for v in out]


def _shape(kind: str, k0: float, target: float, u: float) -> float:
    if kind == "linear":
        return k0 + (target - k0) * u
    if kind == "cubic":
        return target + (k0 - target) * (1 - u) ** 3
    return k0 * (target / k0) ** u


def stage_budgets(
    schedule: Schedule, flops: float | None, nnz: float | None
) -> list[tuple[float | None, float | None]]:
    """(flops, nnz) kept fractions per stage; a budget that is None stays None. A stage
    other than the last is dropped (the next stage takes its share) when, for every budget
    given, it would prune less than ``schedule.min_step`` beyond the previous kept stage
    or leave less than that for the stages after it."""
    T = schedule.num_stages
    f = schedule.fractions(flops) if flops is not None else [None] * T
    s = schedule.fractions(nnz) if nnz is not None else [None] * T
    targets = (flops, nnz)
    plan, prev = [], (1.0, 1.0)
    for k, pair in enumerate(zip(f, s, strict=True)):
        small = [p - v < schedule.min_step or v - t < schedule.min_step
                 for p, v, t in zip(prev, pair, targets, strict=True) if v is not None]
        if k < T - 1 and all(small):
            continue
        plan.append(pair)
        prev = tuple(1.0 if v is None else v for v in pair)
    return plan


def as_schedule(
    value: Schedule | str | Sequence[float] | None,
    stages: int | None = None,
    default_stages: int = 5,
    min_step: float = 0.0,
) -> Schedule:
    """A Schedule from a Schedule, a kind name, or an explicit list of kept fractions;
    ``stages`` (default ``default_stages``) sets the number of stages of a named or default
    schedule and must agree with a Schedule or list given in full; ``min_step`` is that of
    a named or default schedule."""
    if value is None or isinstance(value, str):
        return Schedule(stages=default_stages if stages is None else stages,
                        kind="cubic" if value is None else value, min_step=min_step)
    if isinstance(value, Schedule):
        if stages is not None and stages != value.num_stages:
            raise ConfigError(
                f"stages={stages} disagrees with the schedule's {value.num_stages} stages; "
                "give the number of stages in one place"
            )
        return value
    try:
        if stages is not None and stages != len(value):  # type: ignore[arg-type]
            raise ConfigError(
                f"stages={stages} disagrees with the {len(value)} levels of the explicit "  # type: ignore[arg-type]
                "schedule; drop stages or the extra levels"
            )
        return Schedule(levels=tuple(value))
    except TypeError as e:
        raise ConfigTypeError(
            f"schedule must be a Schedule, one of {KINDS} or a list of kept fractions, got "
            f"{value!r}"
        ) from e


#: the schedule of a multi-stage method that sets none: 8 cubic stages
DEFAULT_SCHEDULE = Schedule(8, "cubic", min_step=0.01)
