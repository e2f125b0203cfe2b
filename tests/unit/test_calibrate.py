import pytest
import torch

from ditfastattn_core import CallContext, RunState, Strategy, TokenLayout
from ditfastattn_core.calibrate import (
    FastCalibrator,
    GuidedCalibrator,
    PaperCalibrator,
    budget,
    guided_rows,
    schedule_from_rows,
)

F, W, C, X, T = Strategy.FULL, Strategy.WA_RS, Strategy.ASC, Strategy.WA_RS_ASC, Strategy.AST

# A model whose whole-output loss is known: layer i's strategy perturbs elements of region i
# (1000 elements each, out of 4000) from 1.0 to 2.0, so each perturbed element adds 0.5/4000
# to the mean relative error. CONTRIB[i][s] is the loss layer i adds under strategy s.
CONTRIB = [
    {T: 0.04, X: 0.01, W: 0.01, C: 0.01},
    {T: 0.08, X: 0.07, W: 0.03, C: 0.01},
    {T: 0.10, X: 0.09, W: 0.09, C: 0.06},
]


class KnownModel:
    def __init__(self):
        self.calls = []

    def forward(self, row, write):
        self.calls.append((tuple(row), write))
        out = torch.ones(4000)
        for i, s in enumerate(row):
            if s is not F:
                n = round(CONTRIB[i][s] * 4000 / 0.5)
                out[i * 1000 : i * 1000 + n] = 2.0
        return out


def test_budget_is_cumulative():
    assert budget(0, 3, 0.15) == pytest.approx(0.05)
    assert budget(2, 3, 0.15) == pytest.approx(0.15)


def test_paper_mode_reproduces_the_hand_computed_decisions():
    # delta 0.15 over 3 layers: budgets 0.05, 0.10, 0.15 on the cumulative loss.
    # layer 0: AST adds 0.04 -> 0.04 < 0.05: AST.
    # layer 1: AST 0.12, WA_RS_ASC 0.11 fail; WA_RS 0.07 < 0.10: WA_RS.
    # layer 2: AST 0.17, WA_RS_ASC 0.16, WA_RS 0.16 fail; ASC 0.13 < 0.15: ASC.
    model = KnownModel()
    cal = PaperCalibrator(layers=3, delta=0.15, has_cfg=True)
    cal.calibrate_step(0, model.forward)
    assert cal.rows[0] == [F, F, F]
    assert model.calls == [((F, F, F), True)], "step 0 is all FULL, one writing forward"
    model.calls.clear()
    cal.calibrate_step(1, model.forward)
    assert cal.rows[1] == [T, W, C]
    assert cal.losses[1] == pytest.approx(0.13)
    writes = [c for c in model.calls if c[1]]
    assert writes == [((T, W, C), True)], "exactly one writing forward, with the chosen row, last"
    assert model.calls[0] == ((F, F, F), False), "the reference is all FULL and read-only"
    tried_layer1 = [row[1] for row, w in model.calls if not w and row[0] is T and row[2] is F and row[1] is not F]
    assert tried_layer1 == [T, X, W], "candidates in Algorithm 1's order, stopping at the first pass"


def test_without_cfg_the_asc_candidates_are_skipped():
    model = KnownModel()
    cal = PaperCalibrator(layers=3, delta=0.15, has_cfg=False)
    cal.calibrate_step(0, model.forward)
    cal.calibrate_step(1, model.forward)
    assert cal.rows[1] == [T, W, F]
    assert not any(s.shares_cfg for row, _ in model.calls for s in row)


def test_window_and_ast_need_their_caches():
    model = KnownModel()
    cal = PaperCalibrator(layers=3, delta=10.0, has_cfg=True)
    cal.calibrate_step(0, model.forward)
    # step 2 without a written step 1 (the model call was skipped): AST is not valid
    cal.calibrate_step(2, model.forward)
    assert T not in cal.rows[2]
    assert cal.rows[2] == [X, X, X]


def test_a_trial_with_cache_misses_is_rejected():
    misses = {"n": 0}
    model = KnownModel()

    def forward(row, write):
        if not write and row[0] is T:
            misses["n"] += 1  # the run reports that AST fell back to dense
        return model.forward(row, write)

    cal = PaperCalibrator(layers=3, delta=0.15, has_cfg=True, miss_count=lambda: misses["n"])
    cal.calibrate_step(0, forward)
    cal.calibrate_step(1, forward)
    assert cal.rows[1][0] is X


def test_candidates_can_be_restricted_and_delta_must_be_positive():
    model = KnownModel()
    cal = PaperCalibrator(layers=3, delta=1.0, has_cfg=True, candidates=(W,))
    cal.calibrate_step(0, model.forward)
    cal.calibrate_step(1, model.forward)
    assert cal.rows[1] == [W, W, W]
    with pytest.raises(ValueError, match="delta"):
        PaperCalibrator(layers=3, delta=0.0, has_cfg=True)


def test_schedule_from_rows_fills_missing_steps_with_full():
    sched = schedule_from_rows({0: [F, F], 2: [T, W]}, steps=3, layers=2)
    assert sched.to_letters() == ["FF", "FF", "TW"]


# --- fast mode on the real engine -----------------------------------------------------------

LAYOUT = TokenLayout.image_only((8, 8))


def _qkv(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 2, 64, 8, generator=g) for _ in range(3)]


def test_fast_mode_picks_ast_when_the_inputs_did_not_change_and_full_when_nothing_passes():
    state = RunState()
    cal = FastCalibrator(layers=1, delta=1e-3, has_cfg=True)
    q, k, v = _qkv(0)
    for step in (0, 1):
        cal.begin_step(step)
        ctx = CallContext(step=step, cond_or_uncond=(1, 0), tokens=LAYOUT)
        cal.attention(q, k, v, 0, ctx, state, dense=lambda *a: torch.nn.functional.scaled_dot_product_attention(*a))
        cal.end_step(step)
    assert cal.rows[1] == [T], "same q, k, v as the previous step: reusing it is exact"
    q2, k2, v2 = _qkv(1)
    cal.begin_step(2)
    ctx = CallContext(step=2, cond_or_uncond=(1, 0), tokens=LAYOUT)
    out = cal.attention(q2, k2, v2, 0, ctx, state, dense=lambda *a: torch.nn.functional.scaled_dot_product_attention(*a))
    assert cal.rows[2] == [F]
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q2, k2, v2))


def test_fast_mode_decides_once_per_step_and_layer():
    state = RunState()
    cal = FastCalibrator(layers=1, delta=10.0, has_cfg=True)
    q, k, v = _qkv(0)
    dense = torch.nn.functional.scaled_dot_product_attention
    cal.begin_step(0)
    cal.attention(q, k, v, 0, CallContext(step=0, cond_or_uncond=(1, 0), tokens=LAYOUT), state, dense=dense)
    cal.end_step(0)
    cal.begin_step(1)
    cal.attention(q, k, v, 0, CallContext(step=1, cond_or_uncond=(0,), tokens=LAYOUT), state, dense=dense)
    first = list(cal.rows[1])
    cal.attention(q, k, v, 0, CallContext(step=1, cond_or_uncond=(1,), tokens=LAYOUT), state, dense=dense)
    assert cal.rows[1] == first, "the uncond call of the same step follows the cond call's choice"


# --- guided mode ----------------------------------------------------------------------------

DENSE = torch.nn.functional.scaled_dot_product_attention


def _branch_constant_qkv(cond_value, uncond_value):
    """Batch rows (uncond, cond), as ComfyUI's cond_or_uncond (1, 0): with a value that is the
    same for every token, attention returns that value whatever q and k are, so every output
    below is known by hand."""
    q, k, _ = _qkv(3)
    v = torch.empty(2, 2, 64, 8)
    v[0], v[1] = uncond_value, cond_value
    return q, k, v


def test_guided_rows_combine_the_branches_as_the_sampler_does():
    ctx = CallContext(step=1, cond_or_uncond=(1, 0), tokens=LAYOUT)
    out = torch.stack([torch.full((3,), 0.5), torch.full((3,), 2.0)])  # rows: uncond, cond
    # uncond + 6 * (cond - uncond) = 0.5 + 6 * 1.5
    torch.testing.assert_close(guided_rows(out, ctx, 6.0), torch.full((1, 3), 9.5))
    assert guided_rows(out, ctx, 1.0) is out, "cfg 1: the branches as they are"
    single = CallContext(step=1, cond_or_uncond=(0,), tokens=LAYOUT)
    torch.testing.assert_close(guided_rows(out[:1], single, 6.0), out[:1])


def _choose(cal, q, k, v, step=1):
    state = RunState()
    for s in range(step + 1):
        cal.begin_step(s)
        cal.attention(q, k, v, 0, CallContext(step=s, cond_or_uncond=(1, 0), tokens=LAYOUT), state, dense=DENSE)
        cal.end_step(s)
    return cal.rows[step][0], cal.errors[(step, 0)]


def test_guided_mode_counts_asc_error_as_the_sampler_sees_it():
    # cond attention 1.0, uncond 0.5. ASC gives the uncond rows 1.0.
    # Guided at cfg 6: reference 0.5 + 6 * 0.5 = 3.5; ASC 1.0 + 6 * 0 = 1.0;
    #   relative squared error (2.5 / 3.5)^2 = 0.5102.
    # Side by side (fast mode, relative L1 per element): cond rows 0, uncond |0.5 - 1| / 1 = 0.5;
    #   mean 0.25. With delta 0.4 fast mode takes ASC, guided mode keeps FULL.
    q, k, v = _branch_constant_qkv(1.0, 0.5)
    guided = GuidedCalibrator(layers=1, delta=0.4, has_cfg=True, candidates=(C,), guidance=6.0)
    choice, _ = _choose(guided, q, k, v)
    assert choice is F
    fast = FastCalibrator(layers=1, delta=0.4, has_cfg=True, candidates=(C,))
    choice, err = _choose(fast, q, k, v)
    assert choice is C and err == pytest.approx(0.25, abs=1e-5)
    loose = GuidedCalibrator(layers=1, delta=0.52, has_cfg=True, candidates=(C,), guidance=6.0)
    choice, err = _choose(loose, q, k, v)
    assert choice is C and err == pytest.approx((2.5 / 3.5) ** 2, abs=1e-5)
    # Without guidance (cfg 1) the branches count side by side: 0.5^2 / (1^2 + 0.5^2) = 0.2.
    plain = GuidedCalibrator(layers=1, delta=0.21, has_cfg=True, candidates=(C,), guidance=1.0)
    choice, err = _choose(plain, q, k, v)
    assert choice is C and err == pytest.approx(0.2, abs=1e-5)


def test_guided_mode_runs_one_writing_forward_per_step_and_no_reference():
    calls = []

    def forward(row, write):
        calls.append((row, write))
        return torch.ones(4)

    cal = GuidedCalibrator(layers=2, delta=0.1, has_cfg=True, guidance=6.0)
    for step in range(3):
        cal.calibrate_step(step, forward)
        assert cal.decided(step) is not None
    assert calls == [(None, True)] * 3, "the layers choose inside the step's one forward"
    assert cal.losses[0] == 0.0 and all(cal.losses[s] != cal.losses[s] for s in (1, 2)), "not measured: NaN"
    assert cal.scale == 1.0
