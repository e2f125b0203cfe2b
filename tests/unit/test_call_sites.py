"""Caches belong to one call site and one cond: no call reads what another call of the step kept.

The oracle here never uses the pack's keys: each call's inputs are its own random tensors, so a
reuse that read another call's output would not equal that call's own previous output.
"""

import pytest
import torch

from ditfastattn_core import CallContext, RunState, Schedule, Strategy, TokenLayout, attend
from ditfastattn_core.engine import keep_module_output, reuse_module_output
from ditfastattn_core.state import CacheKey

F, W, C, X, T = Strategy.FULL, Strategy.WA_RS, Strategy.ASC, Strategy.WA_RS_ASC, Strategy.AST
LAYOUT = TokenLayout.image_only((4, 6))
N = LAYOUT.seq_len


def qkv(seed, batch=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 2, N, 8, generator=g) for _ in range(3)]


def dense(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def ctx(step, site="main", cfg=(0,), **kw):
    return CallContext(step=step, cond_or_uncond=tuple(cfg), tokens=LAYOUT, site=site, **kw)


def run_step(state, step, sites, strategy, seeds):
    """One step: a model call per site (each with its own inputs), the layer under ``strategy``."""
    outs = {}
    for site in sites:
        state.begin_step(step)
        state.note_call(step, site)
        outs[site] = attend(*qkv(seeds[site] + step), strategy, 0, ctx(step, site), state)
    return outs


@pytest.mark.parametrize("windows", [("frames 0-3", "frames 3-6", "frames 6-9")])
def test_ast_reads_its_own_call_sites_output(windows):
    state = RunState(Schedule.from_letters(["F", "T", "T"]))
    seeds = {w: 100 * i for i, w in enumerate(windows)}
    first = run_step(state, 0, windows, F, seeds)
    second = run_step(state, 1, windows, T, seeds)
    third = run_step(state, 2, windows, T, seeds)
    for w in windows:
        assert torch.equal(second[w], first[w]) and torch.equal(third[w], first[w]), w
    assert state.stats["reuse"] == 2 * len(windows) and not state.misses


def test_wa_rs_adds_its_own_call_sites_residual():
    state = RunState(Schedule.from_letters(["F", "W"]))
    sites = ("a", "b")
    seeds = {"a": 1, "b": 2}
    run_step(state, 0, sites, F, seeds)
    for site in sites:
        q, k, v = qkv(seeds[site])  # the same inputs as its FULL step: WA-RS then equals FULL
        state.note_call(1, site)
        out = attend(q, k, v, W, 0, ctx(1, site), state)
        torch.testing.assert_close(out, dense(q, k, v), atol=1e-6, rtol=1e-6)
    assert state.stats["window"] == 2 and not state.misses


def test_a_site_that_did_not_run_at_the_step_read_runs_full_counted_under_its_reason():
    state = RunState(Schedule.from_letters(["F", "T", "T"]))
    run_step(state, 0, ("a",), F, {"a": 0})
    out = run_step(state, 1, ("a", "b"), T, {"a": 0, "b": 7})
    assert torch.equal(out["b"], dense(*qkv(8))), "site b has nothing kept: FULL on its own inputs"
    assert state.stats["ast_no_site"] == 1 and state.site_misses[("ast_no_site", "b")] == 1
    assert state.stats["reuse"] == 1


def test_a_step_without_any_model_call_is_a_skipped_step():
    state = RunState(Schedule.from_letters(["F", "F", "T"]))
    run_step(state, 0, ("a",), F, {"a": 0})
    run_step(state, 2, ("a",), T, {"a": 0})
    assert state.stats["ast_skipped_step"] == 1 and "reuse" not in state.stats


def test_residual_of_a_site_that_missed_the_full_step():
    state = RunState(Schedule.from_letters(["F", "F", "W"]))
    run_step(state, 0, ("a", "b"), F, {"a": 0, "b": 5})
    run_step(state, 1, ("a",), F, {"a": 0})
    run_step(state, 2, ("a", "b"), W, {"a": 0, "b": 5})
    assert state.stats["residual_no_site"] == 1 and state.stats["window"] == 1


def test_conds_of_one_branch_keep_their_own_outputs():
    """ConditioningCombine or area conds: two positive conds, in one call or in separate ones."""
    state = RunState(Schedule.from_letters(["F", "T"]))
    q, k, v = qkv(0, batch=2)
    both = ctx(0, cfg=(0, 0), conds=("u1", "u2"))
    full = attend(q, k, v, F, 0, both, state)
    for i, uuid in enumerate(("u2", "u1")):  # next step: separate calls, the other order
        rows = slice(1 - i, 2 - i)
        out = attend(q[rows], k[rows], v[rows], T, 0, ctx(1, cfg=(0,), conds=(uuid,)), state)
        assert torch.equal(out, full[rows]), uuid


def test_cfg_sharing_reads_only_its_own_sites_conditional_output():
    state = RunState()
    q, k, v = qkv(0)
    attend(q, k, v, C, 0, ctx(0, "main", cfg=(0,)), state)  # a separate cond call publishes
    qu, ku, vu = qkv(1)
    other = attend(qu, ku, vu, C, 0, ctx(0, "guidance", cfg=(1,)), state)
    assert torch.equal(other, dense(qu, ku, vu)) and state.stats["asc_miss"] == 1
    same = attend(qu, ku, vu, C, 0, ctx(0, "main", cfg=(1,)), state)
    assert torch.equal(same, dense(q, k, v)) and state.stats["cfg_copy"] == 1


def test_two_conds_published_at_one_site_leave_nothing_to_share():
    state = RunState()
    for seed, uuid in ((0, "a"), (1, "b")):
        attend(*qkv(seed), C, 0, ctx(0, cfg=(0,), conds=(uuid,)), state)
    qu, ku, vu = qkv(2)
    out = attend(qu, ku, vu, C, 0, ctx(0, cfg=(1,), conds=("n",)), state)
    assert torch.equal(out, dense(qu, ku, vu)) and state.stats["asc_miss"] == 1


def test_no_cfg_sharing_between_conds_that_are_not_a_cfg_pair():
    """Dual CFG calls [negative, middle, positive]: index 0 is not a positive to copy."""
    state = RunState()
    q, k, v = qkv(0, batch=3)
    out = attend(q, k, v, C, 0, ctx(0, cfg=(0, 1, 2), cfg_pair=False), state)
    assert torch.equal(out, dense(q, k, v))
    assert "cfg_copy" not in state.stats and state.stats["asc_not_cfg_pair"] == 1


def test_extra_conds_read_their_own_residual_under_a_sharing_strategy():
    """PerpNeg's [positive, negative, empty]: the empty cond (branch 2) computes its own rows
    under WA-RS+ASC, so the plan keeps its residual as it keeps the conditional one."""
    state = RunState(Schedule.from_letters(["F", "X"]))
    q, k, v = qkv(0, batch=3)
    full = attend(q, k, v, F, 0, ctx(0, cfg=(0, 1, 2)), state)
    assert {key.branch for key in state.residuals} == {0, 2}
    out = attend(q, k, v, X, 0, ctx(1, cfg=(0, 1, 2)), state)
    torch.testing.assert_close(out[2:], full[2:], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out[1:2], out[0:1])
    assert state.stats["window"] == 2 + 0 and state.stats["cfg_copy"] == 1 and not state.misses


def test_module_outputs_follow_the_engines_rules_per_site():
    """PixArt keeps whole module outputs; the separate unconditional call's output under ASC is
    kept as the conditional's (one tensor), and each site reads its own."""
    state = RunState(Schedule.from_letters(["C", "T"]))
    outs = {}
    for site in ("a", "b"):
        state.note_call(0, site)
        cond = ctx(0, site, cfg=(0,), module_outputs=True)
        attend(*qkv(0), C, 0, cond, state)
        outs[site] = torch.randn(1, N, 16, generator=torch.Generator().manual_seed(hash(site) % 1000))
        keep_module_output(C, 0, cond, state, outs[site])
        uncond = ctx(0, site, cfg=(1,), module_outputs=True)
        attend(*qkv(1), C, 0, uncond, state)
        keep_module_output(C, 0, uncond, state, outs[site] * 1.0)
        kept = state.outputs[CacheKey(0, 1, site)][0]
        assert kept is state.outputs[CacheKey(0, 0, site)][0], "aliased, not kept twice"
    for site in ("a", "b"):
        state.note_call(1, site)
        for branch in (0, 1):
            got = reuse_module_output(T, 0, ctx(1, site, cfg=(branch,), module_outputs=True), state, (1, N, 16))
            assert torch.equal(got, outs[site]), (site, branch)


def test_a_call_context_accepts_a_guiders_extra_conds_and_refuses_nonsense():
    assert len(ctx(0, cfg=(0, 1, 2)).chunks(3)) == 3
    with pytest.raises(ValueError, match="invalid branch"):
        ctx(0, cfg=(0, -1))
    with pytest.raises(ValueError, match="cond identities"):
        ctx(0, cfg=(0, 1), conds=("a",))


def test_several_positive_conds_have_no_single_output_to_share():
    state = RunState()
    q, k, v = qkv(0, batch=3)
    out = attend(q, k, v, C, 0, ctx(0, cfg=(0, 0, 1), conds=("a", "b", "n")), state)
    assert torch.equal(out, dense(q, k, v))
    assert "cfg_copy" not in state.stats and state.stats["asc_several_conds"] == 1


def test_a_single_cond_list_call_is_not_counted_as_unshared():
    """Skip-layer guidance's and PerpNeg's extra calls hold one cond: nothing to share, nothing lost."""
    state = RunState()
    attend(*qkv(0), C, 0, ctx(0, cfg=(0,), cfg_pair=False), state)
    assert "asc_not_cfg_pair" not in state.stats and not state.shared_cond, "and it publishes nothing"


# --- naming call sites (comfy_bridge/call_sites.py needs no ComfyUI) ------------------------------


class _Window:
    def __init__(self, frames, anchor=None):
        self.index_list = list(frames)
        if anchor is not None:
            self.causal_anchor_index = anchor


def test_site_tracker_names_each_call_of_a_model_evaluation():
    from ditfastattn_core.comfy_bridge.call_sites import CallSite, SiteTracker

    tracker = SiteTracker(base_replaced=frozenset({"dit/double_block/0"}))
    sites = []
    for _ in range(2):  # two model evaluations (steps): the same sites in the same order
        tracker.new_evaluation()
        for window in (_Window(range(0, 3)), _Window(range(2, 5), anchor=1)):
            options = {"context_window": window}
            tracker.enter(options, 2)
            sites.append(tracker.site(options))
            tracker.leave()
        skip = {"patches_replace": {"dit": {("double_block", 0): None, ("double_block", 3): None}}}
        for _ in range(2):  # the sampler's own call, then skip-layer guidance's
            tracker.enter(skip if _ else {}, 1 + (not _))
            sites.append(tracker.site(skip if _ else {}))
            tracker.leave()
    first, second = sites[:4], sites[4:]
    assert first == second, "stable from step to step"
    assert first[0] == (CallSite((0, 1, 2), 0, ()), 2)
    assert first[1] == (CallSite((1, 2, 3, 4), 0, ()), 2), "the causal anchor frame is part of the window"
    assert first[2] == (CallSite(None, 0, ()), 2)
    assert first[3] == (CallSite(None, 1, ("dit/double_block/3",)), 1), "ranked after it, blocks beyond the run's own"
    assert first[3][0].is_guidance and not first[3][0].windowed and first[0][0].windowed


def test_a_call_outside_any_calc_cond_batch_is_the_plain_site():
    from ditfastattn_core.comfy_bridge.call_sites import CallSite, SiteTracker

    assert SiteTracker().site({}) == (CallSite(), None)


def test_misses_are_explained_once_per_reason():
    from ditfastattn_core.comfy_bridge.call_sites import CallSite, explain_misses

    window = CallSite((0, 1, 2))
    lines = explain_misses(
        {"ast_no_site": 4, "ast_skipped_step": 2, "asc_not_cfg_pair": 3, "asc_several_conds": 1},
        {("ast_no_site", window): 3, ("ast_no_site", CallSite((4, 5, 6))): 1},
    )
    assert lines[0].startswith("context windows shift from step to step under this schedule: AST ran FULL for 4")
    assert any("EasyCache" in line and "2 layer calls" in line for line in lines)
    assert any("not one positive and one negative" in line for line in lines)
    assert any("several positive conds" in line for line in lines)
    assert explain_misses({"reuse": 10}, {}) == []


def test_context_windows_per_step_from_the_handlers_own_schedule():
    from ditfastattn_core.comfy_bridge.call_sites import context_windows

    class Schedule:
        @staticmethod
        def func(frames, handler, options):  # shifts by one frame each step, as uniform schedules do
            return [list(range(s, s + 3)) for s in range(handler._step % 2, frames - 2, 3)]

    class Handler:
        context_schedule, dim, context_length, causal_window_fix, _step = Schedule, 2, 3, True, 0

    windows = context_windows({"context_handler": Handler()}, (1, 16, 9, 4, 6), 3)
    assert windows[0] == [(0, 1, 2), (2, 3, 4, 5), (5, 6, 7, 8)]
    assert windows[1] == [(0, 1, 2, 3), (3, 4, 5, 6)] and windows[2] == windows[0]
    assert context_windows({}, (1, 16, 9, 4, 6), 3) is None
    assert context_windows({"context_handler": Handler()}, (1, 16, 3, 4, 6), 3) is None, "short enough to run whole"
