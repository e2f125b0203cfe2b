import pytest
import torch

from ditfastattn_core import CallContext, RunState, Schedule, Strategy, TokenLayout, WindowSpec, attend
from ditfastattn_core.engine import sdpa_dense
from ditfastattn_core.kernels import KERNELS
from ditfastattn_core.state import CacheKey

F, W, C, X, T = Strategy.FULL, Strategy.WA_RS, Strategy.ASC, Strategy.WA_RS_ASC, Strategy.AST
GRID = (6, 8)
LAYOUT = TokenLayout.image_only(GRID)
N = LAYOUT.seq_len


def qkv(batch=2, heads=2, dim=8, seed=0, n=N):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, dim, generator=g) for _ in range(3)]


def ctx(step, cfg=(0,), tokens=LAYOUT, **kw):
    return CallContext(step=step, cond_or_uncond=tuple(cfg), tokens=tokens, **kw)


def dense(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def test_full_is_dense_attention_bit_for_bit():
    q, k, v = qkv()
    out = attend(q, k, v, F, 0, ctx(0, (1, 0)), RunState())
    assert torch.equal(out, dense(q, k, v))


def test_wa_rs_right_after_full_on_same_inputs_equals_full():
    q, k, v = qkv()
    state = RunState(Schedule.from_letters(["F", "W"]))
    full = attend(q, k, v, F, 0, ctx(0, (1, 0)), state)
    wars = attend(q, k, v, W, 0, ctx(1, (1, 0)), state)
    torch.testing.assert_close(wars, full, atol=1e-6, rtol=1e-6)
    assert state.stats["window"] == 2 and state.stats["residual_miss"] == 0


def test_wa_rs_is_window_plus_the_full_step_residual():
    q0, k0, v0 = qkv(seed=0)
    q1, k1, v1 = qkv(seed=1)
    state = RunState(Schedule.from_letters(["F", "W", "W"]))
    attend(q0, k0, v0, F, 0, ctx(0), state)
    w = WindowSpec().bind(LAYOUT)
    residual = dense(q0, k0, v0) - KERNELS["reference"](q0, k0, v0, w)
    for step in (1, 2):
        out = attend(q1, k1, v1, W, 0, ctx(step), state)
        torch.testing.assert_close(out, KERNELS["reference"](q1, k1, v1, w) + residual, atol=1e-6, rtol=1e-5)


def test_wa_rs_without_a_residual_falls_back_to_full_and_says_so():
    q, k, v = qkv()
    state = RunState()
    out = attend(q, k, v, W, 0, ctx(3), state)
    assert torch.equal(out, dense(q, k, v))
    assert state.stats["residual_miss"] == 1


def test_window_without_residual_is_the_window_alone_and_keeps_nothing():
    """The ablation row (WA): the plan's FULL step before it refreshes no residual."""
    q0, k0, v0 = qkv(seed=0)
    q1, k1, v1 = qkv(seed=1)
    state = RunState(Schedule.from_letters(["F", "A"]))
    attend(q0, k0, v0, F, 0, ctx(0), state)
    assert not state.residuals
    out = attend(q1, k1, v1, Strategy.WA, 0, ctx(1), state)
    torch.testing.assert_close(out, KERNELS["reference"](q1, k1, v1, WindowSpec().bind(LAYOUT)), atol=1e-6, rtol=1e-5)
    assert state.stats["window"] == 1 and not state.misses


@pytest.mark.parametrize("cfg", [(0, 1), (1, 0)])
@pytest.mark.parametrize("batch_per_chunk", [1, 3])
def test_asc_copies_the_conditional_rows(cfg, batch_per_chunk):
    q, k, v = qkv(batch=2 * batch_per_chunk)
    calls = []

    def counting_dense(q, k, v):
        calls.append(q.shape[0])
        return dense(q, k, v)

    out = attend(q, k, v, C, 0, ctx(0, cfg), RunState(), dense=counting_dense)
    cond = slice(0, batch_per_chunk) if cfg[0] == 0 else slice(batch_per_chunk, None)
    uncond = slice(batch_per_chunk, None) if cfg[0] == 0 else slice(0, batch_per_chunk)
    assert calls == [batch_per_chunk], "only the conditional rows are computed"
    assert torch.equal(out[cond], dense(q[cond], k[cond], v[cond]))
    assert torch.equal(out[uncond], out[cond])


def test_asc_without_uncond_is_full():
    q, k, v = qkv(batch=1)
    out = attend(q, k, v, C, 0, ctx(0, (0,)), RunState())
    assert torch.equal(out, dense(q, k, v))


def test_asc_across_separate_cond_and_uncond_calls():
    qc, kc, vc = qkv(batch=1, seed=0)
    qu, ku, vu = qkv(batch=1, seed=1)
    state = RunState()
    cond = attend(qc, kc, vc, C, 4, ctx(2, (0,)), state)
    uncond = attend(qu, ku, vu, C, 4, ctx(2, (1,)), state)
    assert torch.equal(uncond, cond)
    # another step, or the uncond call first: never reuse, compute instead
    uncond_next = attend(qu, ku, vu, C, 4, ctx(3, (1,)), state)
    assert torch.equal(uncond_next, dense(qu, ku, vu))
    assert state.stats["asc_miss"] == 1


def test_wa_rs_asc_uses_the_conditional_residual():
    q0, k0, v0 = qkv(seed=0)
    q1, k1, v1 = qkv(seed=1)
    state = RunState(Schedule.from_letters(["F", "X"]))
    attend(q0, k0, v0, F, 0, ctx(0, (1, 0)), state)
    assert set(state.residuals) == {CacheKey(0, 0)}, "only the cond residual is read later"
    out = attend(q1, k1, v1, X, 0, ctx(1, (1, 0)), state)
    w = WindowSpec().bind(LAYOUT)
    residual_cond = (dense(q0, k0, v0) - KERNELS["reference"](q0, k0, v0, w))[1:]
    expected_cond = KERNELS["reference"](q1[1:], k1[1:], v1[1:], w) + residual_cond
    torch.testing.assert_close(out[1:], expected_cond, atol=1e-6, rtol=1e-5)
    assert torch.equal(out[:1], out[1:])


def test_ast_returns_the_previous_step_output():
    q0, k0, v0 = qkv(seed=0)
    q1, k1, v1 = qkv(seed=1)
    state = RunState(Schedule.from_letters(["F", "T", "T", "F"]))
    first = attend(q0, k0, v0, F, 0, ctx(0, (1, 0)), state)
    state.begin_step(1)
    again = attend(q1, k1, v1, T, 0, ctx(1, (1, 0)), state)
    assert torch.equal(again, first)
    state.begin_step(2)
    third = attend(q1, k1, v1, T, 0, ctx(2, (1, 0)), state)
    assert torch.equal(third, first)
    state.begin_step(3)
    assert set(state.outputs) == {CacheKey(0, 1), CacheKey(0, 0)}, "kept while a call may come back to step 2"
    state.begin_step(4)
    assert state.outputs == {}, "freed once no call of the step before the furthest one reads it"


def _calls_of_one_step(state, step, strategy, n=2, cfg=(1, 0)):
    """Several model calls mapped to one step (heun's corrector and the next predictor)."""
    state.begin_step(step)
    outs = []
    for seed in range(n):
        q, k, v = qkv(seed=10 * step + seed)
        misses = state.misses
        outs.append(attend(q, k, v, strategy, 0, ctx(step, cfg), state))
        assert state.misses == misses, f"call {seed} of step {step} missed its cache: {dict(state.stats)}"
    return outs


def test_every_call_of_an_ast_step_reuses_the_previous_step():
    state = RunState(Schedule.from_letters(["F", "T", "T"]))
    (full,) = _calls_of_one_step(state, 0, F, n=1)
    assert all(torch.equal(o, full) for o in _calls_of_one_step(state, 1, T))
    assert all(torch.equal(o, full) for o in _calls_of_one_step(state, 2, T))


def test_every_call_of_the_last_window_step_finds_the_residual():
    state = RunState(Schedule.from_letters(["F", "W", "W"]))
    _calls_of_one_step(state, 0, F)
    _calls_of_one_step(state, 1, W)
    _calls_of_one_step(state, 2, W)
    assert state.stats["window"] == 8 and state.residuals
    state.begin_step(3)
    assert state.residuals, "kept while a call may come back to step 2 (heunpp2 looks one step ahead)"
    state.begin_step(4)
    assert state.residuals == {}


def test_read_only_forwards_free_nothing_at_a_new_step():
    state = RunState(Schedule.from_letters(["F", "W"]))
    _calls_of_one_step(state, 0, F, n=1)
    with state.read_only():
        state.begin_step(2)
    assert state.residuals and state.step == 0


@pytest.mark.parametrize("record_calls", [False, True])
def test_ast_after_a_skipped_step_is_a_cache_miss(record_calls):
    q, k, v = qkv()
    state = RunState(Schedule.from_letters(["F", "F", "T"]))
    if record_calls:
        state.note_call(0, ())
    attend(q, k, v, F, 0, ctx(0), state)
    # step 1's model call was skipped (a step cache): step 2 must not reuse step 0's output
    q2, k2, v2 = qkv(seed=5)
    if record_calls:
        state.note_call(2, ())
    out = attend(q2, k2, v2, T, 0, ctx(2), state)
    assert torch.equal(out, dense(q2, k2, v2))
    assert state.stats["ast_skipped_step" if record_calls else "ast_miss"] == 1 and state.misses == 1


def test_caches_are_allocated_only_when_the_plan_reads_them():
    q, k, v = qkv()
    sched = Schedule.from_letters(["FF", "FW", "TF", "FF"])
    state = RunState(sched)
    state.begin_step(0)
    attend(q, k, v, F, 0, ctx(0, (1, 0)), state)
    attend(q, k, v, F, 1, ctx(0, (1, 0)), state)
    assert set(state.residuals) == {CacheKey(1, 1), CacheKey(1, 0)} and state.outputs == {}
    state.begin_step(1)
    attend(q, k, v, F, 0, ctx(1, (1, 0)), state)
    assert set(state.outputs) == {CacheKey(0, 1), CacheKey(0, 0)}, "layer 0 is AST at step 2"
    attend(q, k, v, W, 1, ctx(1, (1, 0)), state)
    state.begin_step(3)
    assert state.residuals == {}, "no step from 2 on reads layer 1's residual"
    windows = []
    attend(q, k, v, F, 1, ctx(3, (1, 0)), state, dense=lambda *a: windows.append(1) or dense(*a))
    assert len(windows) == 1 and state.residuals == {}, "the last FULL refreshes nothing"


def test_comfy_layouts_round_trip():
    q, k, v = qkv(batch=2, heads=2, dim=8)
    flat = [t.transpose(1, 2).reshape(2, N, 16) for t in (q, k, v)]
    out_flat = attend(*flat, F, 0, ctx(0), RunState(), heads=2, skip_reshape=False, skip_output_reshape=False)
    assert out_flat.shape == (2, N, 16)
    torch.testing.assert_close(out_flat, dense(q, k, v).transpose(1, 2).reshape(2, N, 16))
    out_bhld = attend(*flat, F, 0, ctx(0), RunState(), heads=2, skip_reshape=False, skip_output_reshape=True)
    assert out_bhld.shape == (2, 2, N, 8)


def test_shape_mismatches_raise_before_computing():
    q, k, v = qkv(batch=3)
    never = []
    with pytest.raises(ValueError, match="cannot be split"):
        attend(q, k, v, F, 0, ctx(0, (1, 0)), RunState(), dense=lambda *a: never.append(1))
    q, k, v = qkv(batch=2, n=N + 1)
    with pytest.raises(ValueError, match="token layout"):
        attend(q, k, v, W, 0, ctx(1), RunState(), dense=lambda *a: never.append(1))
    with pytest.raises(ValueError, match="token layout"):
        attend(*qkv(), W, 0, ctx(1, tokens=None), RunState(), dense=lambda *a: never.append(1))
    with pytest.raises(ValueError, match="heads"):
        attend(torch.zeros(1, N, 10), torch.zeros(1, N, 10), torch.zeros(1, N, 10), F, 0, ctx(0),
               RunState(), heads=3, skip_reshape=False)
    assert never == []


def test_unmapped_call_runs_full_and_caches_nothing():
    q, k, v = qkv()
    state = RunState(Schedule.from_letters(["F", "T"]))
    out = attend(q, k, v, T, 0, ctx(None), state)
    assert torch.equal(out, dense(q, k, v))
    assert state.outputs == {} and state.stats["unmapped"] == 1


def test_read_only_state_is_not_written():
    q, k, v = qkv()
    state = RunState()
    with state.read_only():
        attend(q, k, v, F, 0, ctx(0, (1, 0)), state)
    assert state.residuals == {} and state.outputs == {} and not state.stats
    attend(q, k, v, F, 0, ctx(0, (1, 0)), state)
    assert state.residuals and state.outputs
    state.reset()
    assert state.cache_bytes() == 0


def test_sdpa_dense_honours_scale():
    q, k, v = qkv()
    torch.testing.assert_close(
        sdpa_dense(0.5)(q, k, v), torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.5)
    )


def test_a_caller_that_keeps_module_outputs_gets_no_attention_outputs_kept():
    # PixArt's patched module keeps its whole output for AST; the engine must not keep a
    # second, attention-level copy (memory), and keeps residuals as before
    q, k, v = qkv()
    for module_outputs, kept in ((False, 2), (True, 0)):
        state = RunState(Schedule.from_letters(["F", "T"]))
        attend(q, k, v, F, 0, ctx(0, (1, 0), module_outputs=module_outputs), state)
        assert sum(len(per_step) for per_step in state.outputs.values()) == kept
    state = RunState(Schedule.from_letters(["F", "W"]))
    attend(q, k, v, F, 0, ctx(0, (1, 0), module_outputs=True), state)
    assert len(state.residuals) == 2
