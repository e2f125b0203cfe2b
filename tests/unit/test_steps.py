"""Mapping model calls to plan steps by sigma: whole runs, split runs, multi-call samplers."""

import math

import pytest

from ditfastattn_core.steps import NORMALISED, STRICT, StepCountError, StepMapper, match_sigma, range_offset

# A Karras-like schedule, 8 steps: model calls at the first 8 values.
PLAN = tuple(14.6 * (0.03 / 14.6) ** (i / 7) for i in range(8)) + (0.0,)


def test_each_schedule_sigma_maps_to_its_step():
    m = StepMapper.for_run(PLAN, PLAN)
    assert m.by_sigma and [m.plan_step(s) for s in PLAN[:-1]] == list(range(8))
    assert m.plan_step(0.0) is None


def test_calls_between_steps_map_to_none():
    m = StepMapper.for_run(PLAN, PLAN)
    mid = math.sqrt(PLAN[2] * PLAN[3])  # dpm_2's midpoint in log sigma
    assert m.plan_step(mid) is None
    gap = math.log(PLAN[2] / PLAN[3])
    assert m.plan_step(PLAN[2] * math.exp(-0.01 * gap)) == 2, "float noise around a step still maps"
    assert m.plan_step(PLAN[2] * math.exp(-0.25 * gap)) is None, "a quarter of the way to the next does not"


def test_float_error_of_an_ancestral_second_evaluation_still_maps():
    """dpmpp_2s_ancestral (eta 1) evaluates at sqrt(sigma_i * sigma_down) == sigma_i+1, but
    computes sigma_down with cancellation: float32 errors around 3e-4 were seen."""
    sigmas = (157.4, 9.489, 1.4624, 0.0100005, 0.0)
    assert match_sigma(sigmas, 0.0099973) == 3
    assert match_sigma(sigmas, 9.488909) == 1


@pytest.mark.parametrize("start,end", [(0, 3), (3, 8), (2, 5), (0, 8)])
@pytest.mark.parametrize("full_denoise", [True, False])
def test_a_split_run_maps_by_sigma_onto_its_range(start, end, full_denoise):
    run = PLAN[start : end + 1]
    if full_denoise and end < 8:
        run = run[:-1] + (0.0,)  # KSamplerAdvanced without leftover noise ends at 0
    for mode in (STRICT, NORMALISED):
        m = StepMapper.for_run(PLAN, run, mode)
        assert m.offset == start and m.plan_range == range(start, end)
        assert [m.plan_step(s) for s in run[:-1]] == list(range(start, end))


def test_denoise_below_one_samples_the_tail_of_the_schedule():
    assert range_offset(PLAN, PLAN[5:]) == 5


def test_a_run_off_the_plan_schedule_with_another_step_count_is_refused_in_strict_mode():
    other = tuple(s * 0.7 for s in PLAN[:5]) + (0.0,)
    with pytest.raises(StepCountError, match="not a range of the plan's schedule.*normalised"):
        StepMapper.for_run(PLAN, other)
    m = StepMapper.for_run(PLAN, other, NORMALISED)
    assert not m.by_sigma and [m.plan_step(s) for s in other[:-1]] == [0, 2, 4, 5, 7]


def test_same_step_count_on_another_schedule_maps_by_position():
    other = tuple(s * 0.5 for s in PLAN[:-1]) + (0.0,)
    m = StepMapper.for_run(PLAN, other)
    assert not m.by_sigma and [m.plan_step(s) for s in other[:-1]] == list(range(8))


def test_a_non_contiguous_run_is_not_a_range():
    assert range_offset(PLAN, PLAN[0:2] + PLAN[3:5]) is None


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="step mode"):
        StepMapper.for_run(PLAN, PLAN, "fuzzy")
