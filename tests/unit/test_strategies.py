"""The strategy table is self-consistent, and what derives from it follows it."""

import pytest

from ditfastattn_core import Cache, Compute, Schedule, Strategy
from ditfastattn_core.calibrate import Availability
from ditfastattn_core.strategies import (
    CANDIDATE_ORDER,
    DEFAULT_CANDIDATES,
    OFFERED_CANDIDATES,
    SWITCHES,
    legend,
)


def test_letters_are_unique_and_never_aliased():
    # an Enum silently turns a repeated value into an alias: a new row must bring a new letter
    assert len(Strategy.__members__) == len(Strategy) == len({s.letter for s in Strategy})
    assert all(len(s.letter) == 1 for s in Strategy)


def test_plan_letters_keep_their_meaning():
    # part of the plan file format: these must never change
    assert {s.name: s.letter for s in Strategy} == {"FULL": "F", "WA_RS": "W", "ASC": "C", "WA_RS_ASC": "X", "AST": "T",
                                                    "WA": "A", "SPARSE": "S"}


def test_every_sharing_strategy_has_a_form_without_sharing():
    for s in Strategy:
        base = s.without_cfg_sharing
        assert not base.shares_cfg and base.compute is s.compute
        assert base.cost(0.3, has_cfg=True) == s.cost(0.3, has_cfg=False)


def test_candidates_are_ranked_once_and_full_is_the_fallback():
    ranks = [s.candidate_rank for s in CANDIDATE_ORDER]
    assert ranks == sorted(set(ranks))
    assert Strategy.FULL not in CANDIDATE_ORDER and Strategy.FULL.candidate_rank is None
    assert CANDIDATE_ORDER == (Strategy.AST, Strategy.WA_RS_ASC, Strategy.WA_RS, Strategy.ASC, Strategy.WA,
                               Strategy.SPARSE)
    assert DEFAULT_CANDIDATES == OFFERED_CANDIDATES == (Strategy.AST, Strategy.WA_RS_ASC, Strategy.WA_RS, Strategy.ASC), \
        "neither the ablation nor Sol-Attn is a default: a saved workflow calibrates as it did"
    assert SWITCHES == (Strategy.AST, Strategy.WA_RS_ASC, Strategy.WA_RS, Strategy.ASC, Strategy.SPARSE)


def test_costs_follow_what_is_computed():
    f, sp = 0.2, 0.3
    assert [s.cost(f, True, sp) for s in Strategy] == [1.0, f, 0.5, f / 2, 0.0, f, sp]
    assert Compute.REUSE.flops(f) == 0.0 and Compute.DENSE.flops(f) == 1.0
    assert Strategy.SPARSE.cost(f, True) == 1.0, "a layout-less sparse call is not assumed to save anything"


def test_caches_read_and_written():
    assert Strategy.FULL.refreshes_residual and not any(s.refreshes_residual for s in Strategy if s is not Strategy.FULL)
    assert [s for s in Strategy if s.reads_previous_output] == [Strategy.AST]
    assert all(Cache.OUTPUT in s.writes for s in Strategy)
    # a sharing strategy computes, and so reads, the conditional residual only
    assert Strategy.WA_RS_ASC.reads_residual(0) and not Strategy.WA_RS_ASC.reads_residual(1)
    assert Strategy.WA_RS.reads_residual(0) and Strategy.WA_RS.reads_residual(1)


@pytest.mark.parametrize("strategy,step,layer,expected", [
    (Strategy.AST, 1, 0, True),       # step 0 was written
    (Strategy.AST, 2, 0, False),      # step 1 was not
    (Strategy.WA_RS, 1, 0, True),     # layer 0 had a FULL step
    (Strategy.WA_RS, 1, 1, False),    # layer 1 never did: no residual
    (Strategy.ASC, 1, 1, True),
])
def test_availability_derives_from_the_caches_a_strategy_reads(strategy, step, layer, expected):
    available = Availability(layers=2, has_cfg=True)
    available.written(0, [Strategy.FULL, Strategy.ASC])
    assert available.valid(step, layer, strategy) is expected
    assert not Availability(layers=2, has_cfg=False).valid(1, 0, Strategy.ASC), "no branch to share with"


def test_schedule_lookahead_uses_the_table():
    sched = Schedule.from_letters(["FF", "WT", "XF", "TW"])
    assert sched.reads_residual_later(0, 0, 0) and sched.reads_residual_later(0, 0, 1)
    assert sched.residual_source(3, 1) == 2
    assert sched.next_is_ast(0, 1) and sched.next_is_ast(2, 0) and not sched.next_is_ast(1, 0)
    assert Schedule.from_letters(["T"]).problems(), "AST at step 0 reads an output that cannot exist"


def test_legend_is_the_table():
    assert [(e["letter"], e["label"], e["colour"]) for e in legend()] == [(s.letter, s.label, s.colour) for s in Strategy]
    assert len({e["colour"] for e in legend()}) == len(Strategy), "every strategy its own colour"


def test_window_without_residual_is_a_row_the_engine_schedule_and_calibration_read():
    """The paper's ablation is data: no residual read, so nothing to refresh, valid before any FULL."""
    from ditfastattn_core import Schedule

    wa = Strategy.WA
    assert wa.uses_window and not wa.reads_window_residual and not wa.reads_residual(0)
    assert Schedule.from_letters(["A", "A"]).problems() == []
    assert not Schedule.from_letters(["F", "A"]).reads_residual_later(0, 0, 0)
    assert Strategy.WA_RS_ASC.without_cfg_sharing is Strategy.WA_RS and Strategy.ASC.without_cfg_sharing is Strategy.FULL


def test_calibrate_switches_keep_their_numbers():
    """Saved workflows store the Calibrate node's widget values by position: each offered
    candidate has a switch number of its own, 0..n-1, and the ones saved workflows hold keep
    theirs (a new strategy takes the next number, appended after the node's other inputs)."""
    from ditfastattn_core.strategies import OFFERED_CANDIDATES, SWITCHES_IN_PLACE

    numbers = sorted(s.switch for s in OFFERED_CANDIDATES)
    assert numbers == list(range(len(numbers)))
    assert {s.name: s.switch for s in Strategy if s.switch is not None and s.switch < SWITCHES_IN_PLACE} == {
        "AST": 0, "WA_RS_ASC": 1, "WA_RS": 2, "ASC": 3}
    assert Strategy.SPARSE.switch == 4, "the first appended switch: use_sparse, after every other input"
    assert all(s.switch is None for s in Strategy if not s.offered)


def test_sol_attn_is_a_row_that_reads_and_refreshes_nothing():
    """Letter S computes from this call's q, k, v alone: valid at step 0 and before any FULL, no
    residual kept for it, no sharing (its own rows), and off by default."""
    s = Strategy.SPARSE
    assert s.compute is Compute.SPARSE and not s.uses_window and not s.shares_cfg
    assert not s.reads and s.writes == {Cache.OUTPUT} and not s.refreshes_residual
    assert s.without_cfg_sharing is s and s.offered and not s.default_on
    assert Schedule.from_letters(["S", "S"]).problems() == []
    assert Schedule.from_letters(["F", "S", "W"]).residual_source(2, 0) == 0, "S refreshes no residual"
    available = Availability(layers=1, has_cfg=False)
    assert available.valid(0, 0, s)
