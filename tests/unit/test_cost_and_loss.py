import pytest
import torch

from ditfastattn_core import Schedule, Strategy, relative_l1, relative_squared_error, summarize
from ditfastattn_core.cost import refresh_cost

F, W, C, X, T = Strategy.FULL, Strategy.WA_RS, Strategy.ASC, Strategy.WA_RS_ASC, Strategy.AST


@pytest.mark.parametrize(
    "strategy,cfg,expected",
    [(F, True, 1.0), (W, True, 0.25), (C, True, 0.5), (X, True, 0.125), (T, True, 0.0),
     (C, False, 1.0), (X, False, 0.25)],
)
def test_strategy_costs(strategy, cfg, expected):
    assert strategy.cost(0.25, cfg) == expected


def test_window_is_never_free_and_refresh_is_paid():
    sched = Schedule.from_letters(["F", "W", "X", "F"])
    assert refresh_cost(sched, 0, 0, 0.25, has_cfg=True) == 0.25
    only_cond = Schedule.from_letters(["F", "X", "F"])
    assert refresh_cost(only_cond, 0, 0, 0.25, has_cfg=True) == 0.125
    assert refresh_cost(sched, 3, 0, 0.25, has_cfg=True) == 0.0
    s = summarize(sched, 0.25, has_cfg=True)
    assert s.attention_flops == pytest.approx((1 + 0.25 + 0.25 + 0.125 + 1) / 4)
    assert s.counts["FULL"] == 2 and s.counts["WA_RS"] == 1
    assert "of FULL" in s.describe()


def test_all_full_costs_one():
    assert summarize(Schedule.uniform(5, 3), 0.3, True).attention_flops == 1.0


def test_relative_l1_uses_absolute_max():
    ref = torch.tensor([-2.0, 1.0])
    out = torch.tensor([-1.0, 1.0])
    # |(-2) - (-1)| / max(2, 1) = 0.5 on the first element; a signed max would give -1 -> clipped 0
    assert relative_l1(ref, out) == pytest.approx(0.25, rel=1e-5)


def test_relative_l1_clips_and_handles_zeros():
    assert relative_l1(torch.zeros(4), torch.zeros(4)) == 0.0
    assert relative_l1(torch.tensor([0.0]), torch.tensor([1e-12])) <= 10.0
    assert relative_l1(torch.tensor([1.0]), torch.tensor([-1.0])) == pytest.approx(2.0, rel=1e-5)
    with pytest.raises(ValueError):
        relative_l1(torch.zeros(2), torch.zeros(3))


def test_relative_squared_error():
    ref = torch.tensor([3.0, 4.0])
    assert relative_squared_error(ref, ref) == 0.0
    assert relative_squared_error(ref, torch.zeros(2)) == pytest.approx(1.0)
