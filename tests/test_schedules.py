import pytest

from falcon_prune.schedules import Schedule, as_schedule, stage_budgets


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
    "make, match",
    [
        (lambda: Schedule(levels=(0.8, 0.5)).fractions(0.3), "ends at 0.5 kept, above"),
        (lambda: Schedule(levels=(0.5, 0.8)), "increase"),
        (lambda: Schedule(levels=(1.5,)), "not a kept fraction"),
        (lambda: Schedule(stages=0), "stages must be"),
        (lambda: Schedule(kind="quadratic"), "unknown schedule"),
        (lambda: Schedule(start=0.2).fractions(0.3), "below the target"),
        (lambda: as_schedule(3.0), "schedule must be"),
    ],
)
def test_bad_schedules(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()
