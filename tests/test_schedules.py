import pytest

from falcon_prune.errors import ConfigError, ConfigTypeError
from falcon_prune.methods.schedules import Schedule, as_schedule, stage_budgets


@pytest.mark.parametrize("kind", ["linear", "cubic", "exponential"])
@pytest.mark.parametrize("start", [None, 0.8])
def test_levels_non_increasing_and_end_at_target(kind, start):
    levels = Schedule(stages=5, kind=kind, start=start).fractions(0.3)
    assert len(levels) == 5 and levels[-1] == 0.3
    assert all(b <= a for a, b in zip(levels, levels[1:], strict=False))
    assert all(0.3 <= v <= 1 for v in levels)
    if start is not None:
        assert levels[0] == pytest.approx(0.8)


def test_shapes():
    assert Schedule(4, "linear").fractions(0.2) == pytest.approx([0.8, 0.6, 0.4, 0.2])
    cubic = Schedule(4, "cubic").fractions(0.2)
    assert cubic[0] < 0.8  # big steps first
    expo = Schedule(4, "exponential").fractions(0.0625)
    assert expo == pytest.approx([0.5, 0.25, 0.125, 0.0625])
    assert Schedule(1).fractions(0.4) == [0.4]
    assert Schedule(1, start=0.9).fractions(0.4) == [0.4]


def test_explicit_levels_and_both_budgets():
    s = as_schedule([0.8, 0.5, 0.3])
    assert s.num_stages == 3
    assert stage_budgets(s, 0.3, None) == [(0.8, None), (0.5, None), (0.3, None)]
    both = stage_budgets(Schedule(2, "linear"), 0.4, 0.6)
    assert both == [(pytest.approx(0.7), pytest.approx(0.8)), (0.4, 0.6)]


@pytest.mark.parametrize(
    "make, err, match",
    [
        (lambda: Schedule(levels=(0.8, 0.5)).fractions(0.3), ConfigError, "ends at 0.5 kept"),
        (lambda: Schedule(levels=(0.5, 0.8)), ConfigError, "increase"),
        (lambda: Schedule(levels=(1.5,)), ConfigError, "not a kept fraction"),
        (lambda: Schedule(levels=()), ConfigError, "at least one level"),
        (lambda: Schedule(stages=0), ConfigError, "stages must be"),
        (lambda: Schedule(stages=2.5), ConfigError, "stages must be"),
        (lambda: Schedule(kind="quadratic"), ConfigError, "unknown schedule"),
        (lambda: Schedule(start=1.5), ConfigError, "start=1.5 must be"),
        (lambda: Schedule(start=0.2).fractions(0.3), ConfigError, "below the target"),
        (lambda: as_schedule(3.0), ConfigTypeError, "schedule must be"),
        (lambda: as_schedule(Schedule(3), stages=4), ConfigError, "disagrees"),
        (lambda: as_schedule([0.8, 0.5], stages=3), ConfigError, "disagrees"),
        (lambda: Schedule(min_step=1.0), ConfigError, "min_step"),
        (lambda: Schedule(min_step=-0.1), ConfigError, "min_step"),
    ],
)
def test_bad_schedules(make, err, match):
    with pytest.raises(err, match=match):
        make()


@pytest.mark.parametrize("target", [0.6, 0.4, 0.2])
def test_min_step_merges_the_tiny_stages(target):
    full = stage_budgets(Schedule(12, "cubic"), target, None)
    merged = stage_budgets(Schedule(12, "cubic", min_step=0.01), target, None)
    assert len(full) == 12 and 8 <= len(merged) < 12
    levels = [f for f, _ in merged]
    assert levels[-1] == target and set(levels) <= {f for f, _ in full}
    prev = 1.0
    for v in levels[:-1]:  # every stage but the last prunes >= 1 % and leaves >= 1 %
        assert prev - v >= 0.01 and v - target >= 0.01
        prev = v
    assert stage_budgets(Schedule(12, "cubic", min_step=0.0), target, None) == full
    # the cubic's last steps are what goes: at 20 % its last 2 of 12 stages prune < 0.4 %
    assert len(stage_budgets(Schedule(12, "cubic", min_step=0.01), 0.2, None)) == 10


def test_min_step_keeps_a_stage_that_moves_either_budget():
    plan = stage_budgets(Schedule(4, "linear", min_step=0.05), 0.96, 0.5)
    assert len(plan) == 4  # the FLOP steps are 1 %, but the NNZ steps are 12.5 %
    assert stage_budgets(Schedule(4, "linear", min_step=0.05), 0.96, None) == [(0.96, None)]
    assert as_schedule(None, 6, min_step=0.02).min_step == 0.02
    assert as_schedule(Schedule(3), min_step=0.02).min_step == 0.0  # a given Schedule's own
