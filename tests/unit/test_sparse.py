"""Plan letter S: Sol-Attn block-sparse attention (ditfastattn_core/sparse.py), its cost, its
kernels and fail-safes, the engine's fallbacks and calibration's use of it."""

from __future__ import annotations

import json
import logging
import types
from pathlib import Path

import pytest
import torch

from ditfastattn_core import (
    CallContext,
    Plan,
    RunState,
    Schedule,
    Strategy,
    TokenLayout,
    attend,
    sparse,
    summarize,
)
from ditfastattn_core.calibrate import FastCalibrator, GuidedCalibrator, PaperCalibrator

S, F = Strategy.SPARSE, Strategy.FULL
ROOT = Path(__file__).resolve().parents[2]
needs_kitchen = pytest.mark.skipif(not sparse.available(), reason="comfy-kitchen without sol_attn here (< 0.2.40)")
DENSE = torch.nn.functional.scaled_dot_product_attention


def qkv(n, batch=2, heads=2, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, dim, generator=g) for _ in range(3)]


def ctx(step, layout, cfg=(1, 0)):
    return CallContext(step=step, cond_or_uncond=cfg, tokens=layout)


# --- layout and cost -------------------------------------------------------------------------

@pytest.mark.parametrize("layout,moved,sinks", [
    (TokenLayout.image_only((16, 32)), None, (0, 0)),
    (TokenLayout(seq_len=589, image_start=77, grid=(16, 32)), None, (0, 2)),      # text first (Flux, SD3)
    (TokenLayout(seq_len=600, image_start=0, grid=(16, 32)), None, (8, 10)),      # text after (HunyuanVideo)
    (TokenLayout(seq_len=600, image_start=10, grid=(16, 16)), (10, 266), (0, 6)),  # both sides: moved
])
def test_global_tokens_are_sink_blocks(layout, moved, sinks):
    a = sparse.arrange(layout)
    assert a.moved_image == moved and a.sinks == sinks
    perm = a.permutation(torch.device("cpu"))
    order = torch.arange(layout.seq_len) if perm is None else perm
    is_global = (order < layout.image_start) | (order >= layout.image_stop)
    in_sinks = torch.arange(layout.seq_len) // sparse.BLOCK
    in_sinks = (in_sinks >= sinks[0]) & (in_sinks < sinks[1])
    assert not (is_global & ~in_sinks).any(), "every global token sits in a sink block"


def test_keep_fraction_by_hand():
    # 512 image tokens = 8 blocks, no sinks; top-k keeps round(0.25 * 8) = 2 blocks per query block
    # besides the diagonal +-1 (2 blocks at the ends, 3 inside: 22 in all, 38 exact blocks with
    # top-k): exact tokens 64 * 38 per query row of 64, pooled 8 * 8 - 38, routing 8 * 8.
    layout = TokenLayout.image_only((16, 32))
    pairs = 64 * (64 * 38 + 8 * 8 - 38) + 8 * 8
    assert sparse.computed_pairs(layout) == pairs
    assert sparse.keep_fraction(layout) == pytest.approx(pairs / 512**2)
    assert sparse.cost_fraction(layout) == pytest.approx(0.6003, abs=1e-4)


def test_short_sequences_save_nothing_and_cost_dense():
    demo = TokenLayout(seq_len=68, image_start=4, grid=(8, 8))  # the demo model: 64 image + 4 text tokens
    assert sparse.keep_fraction(demo) > 1 and not sparse.saves(demo) and sparse.cost_fraction(demo) == 1.0
    long = TokenLayout(seq_len=4096 + 300, image_start=300, grid=(64, 64))
    assert 0.3 < sparse.cost_fraction(long) < 0.45 and sparse.saves(long)


def test_plan_cost_counts_sol_attn_at_its_fraction():
    grid = (64, 64)
    plan = Plan(schedule=Schedule.from_letters(["FF", "SS"]), family="flux", sigmas=(1.0, 0.5, 0.0), cfg=4.0,
                grid=grid)
    frac = sparse.cost_fraction(TokenLayout.image_only(grid))
    assert plan.cost().attention_flops == pytest.approx((2 + 2 * frac) / 4)
    assert "Sol-Attn" in plan.cost().describe()
    assert Plan.loads(plan.dumps()) == plan
    assert summarize(Schedule.from_letters(["FS"]), 0.25, True).attention_flops == 1.0, "unknown layout: dense"


def test_plan_cost_counts_sol_attn_with_the_text_tokens_calibration_saw():
    """260 tokens (256 image + 4 text, the image demo model): the text block is exact for every
    query, so Sol-Attn keeps 99% there, not the 88% of the image tokens alone."""
    from ditfastattn_core.cache_memory import AttentionSize

    grid = (16, 16)
    plan = Plan(schedule=Schedule.from_letters(["F", "S"]), family="sd3", sigmas=(1.0, 0.5, 0.0), cfg=4.0, grid=grid,
                attention=AttentionSize(260, 128))
    with_text = sparse.cost_fraction(TokenLayout(seq_len=260, image_start=4, grid=grid))
    assert with_text > 0.99 > sparse.cost_fraction(TokenLayout.image_only(grid))
    assert plan.cost().attention_flops == pytest.approx((1 + with_text) / 2)
    at_64 = sparse.cost_fraction(TokenLayout(seq_len=4100, image_start=4, grid=(64, 64)))
    assert plan.cost((64, 64)).attention_flops == pytest.approx((1 + at_64) / 2), "the text stays, the image grows"


def test_shipped_plans_load_and_mean_the_same():
    """Adding a letter changes no old plan: every shipped plan loads, writes back the same JSON
    and costs what its summary says."""
    for path in sorted((ROOT / "plans").glob("*.json")):
        data = json.loads(path.read_text())
        plan = Plan.loads(path.read_text())
        assert Strategy.SPARSE not in plan.schedule.counts()
        assert plan.to_json() == {**data, "pack_version": plan.pack_version}
        assert plan.cost().attention_flops == pytest.approx(data["summary"]["attention_flops"], abs=1e-6)


# --- the computation -------------------------------------------------------------------------

@needs_kitchen
def test_where_every_block_is_exact_it_is_dense_attention():
    layout = TokenLayout(seq_len=100, image_start=4, grid=(8, 12))  # 2 blocks: the diagonal covers both
    q, k, v = qkv(100)
    torch.testing.assert_close(sparse.sol_attention(q, k, v, layout), DENSE(q, k, v), atol=1e-5, rtol=1e-5)


@needs_kitchen
@pytest.mark.parametrize("layout", [
    TokenLayout(seq_len=589, image_start=77, grid=(16, 32)),
    TokenLayout(seq_len=600, image_start=0, grid=(16, 32)),
    TokenLayout(seq_len=600, image_start=10, grid=(16, 16)),
], ids=["text_first", "text_after", "both_sides"])
def test_text_rows_are_exact_wherever_the_text_sits(layout):
    q, k, v = qkv(layout.seq_len, batch=1, heads=1)
    out, want = sparse.sol_attention(q, k, v, layout), DENSE(q, k, v)
    text = torch.cat([torch.arange(0, layout.image_start), torch.arange(layout.image_stop, layout.seq_len)])
    torch.testing.assert_close(out[:, :, text], want[:, :, text], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, want, atol=1e-3), "image rows are sparse: not dense attention"


@needs_kitchen
def test_smooth_inputs_lose_little():
    """Neighbouring tokens alike (as image tokens are): the routed blocks and pooled terms carry
    the attention far better than on white noise."""
    layout = TokenLayout.image_only((32, 32))
    g = torch.Generator().manual_seed(1)
    base = torch.randn(1, 2 * 16, 4, 4, generator=g)
    smooth = torch.nn.functional.interpolate(base, size=(32, 32), mode="bilinear")
    smooth = smooth.reshape(1, 2, 16, 1024).transpose(-1, -2).contiguous()

    def error(q, k, v):
        want = DENSE(q, k, v)
        return float((sparse.sol_attention(q, k, v, layout) - want).norm() / want.norm())

    assert error(smooth, smooth, smooth) < 0.5 * error(*qkv(1024, batch=1))


# --- engine: counted fallbacks, never a crash -----------------------------------------------

LONG = TokenLayout(seq_len=512 + 4, image_start=4, grid=(16, 32))


@needs_kitchen
def test_engine_runs_sol_attn_and_counts_it():
    q, k, v = qkv(LONG.seq_len)
    state = RunState(Schedule.from_letters(["S", "T"]))
    out = attend(q, k, v, S, 0, ctx(0, LONG), state)
    torch.testing.assert_close(out, sparse.sol_attention(q, k, v, LONG))
    assert state.stats["sparse"] == 2 and not state.misses
    state.begin_step(1)
    assert torch.equal(attend(*qkv(LONG.seq_len, seed=3), Strategy.AST, 0, ctx(1, LONG), state), out), \
        "its output is kept for a following AST step"


@pytest.mark.parametrize("case,reason", [("short", "no_gain"), ("no_layout", "no_layout"), ("no_kitchen", "unavailable"),
                                         ("failing", "failed")])
def test_a_call_sol_attn_cannot_run_is_dense_and_counted(monkeypatch, caplog, case, reason):
    layout = TokenLayout(seq_len=68, image_start=4, grid=(8, 8)) if case == "short" else LONG
    if case == "no_kitchen":
        monkeypatch.setattr(sparse, "_reference", lambda: None)
    if case == "failing":
        def broken(*a, **kw):
            raise RuntimeError("kernel exploded")
        monkeypatch.setattr(sparse, "_reference", lambda: broken)
        monkeypatch.setattr(sparse, "_kitchen", lambda: types.SimpleNamespace(sol_attn=broken))
        sparse._say_failed.cache_clear()
    q, k, v = qkv(layout.seq_len)
    state = RunState(Schedule.from_letters(["F", "F", "S"]))
    call = CallContext(step=2, cond_or_uncond=(1, 0), tokens=None if case == "no_layout" else layout)
    caplog.set_level(logging.WARNING, logger="ditfastattn")
    out = attend(q, k, v, S, 0, call, state)
    assert torch.equal(out, DENSE(q, k, v))
    assert state.stats[f"sparse_{reason}"] == 2 and state.misses == 2 and state.stats["dense"] == 2
    if case == "failing":
        attend(q, k, v, S, 0, call, state)
        assert sum("kernel exploded" in r.getMessage() for r in caplog.records) == 1, "one warning line"


class FakeFused:
    """comfy-kitchen's public op as a CUDA machine would offer it, on the CPU: the reference's
    result, or a failure, or a wrong answer."""

    def __init__(self, behaviour):
        self.behaviour, self.calls = behaviour, 0

    def sol_attn_is_available(self, device=None):
        return True

    def sol_attn(self, q, k, v, **kw):
        self.calls += 1
        if self.behaviour == "raise":
            raise RuntimeError("no kernel image for this device")
        out = sparse._reference()(q.float(), k.float(), v.float(), **kw).to(q.dtype)
        return out if self.behaviour == "ok" else torch.zeros_like(out)


@needs_kitchen
@pytest.mark.parametrize("behaviour", ["ok", "raise", "wrong"])
def test_the_fused_op_is_used_where_it_accepts_the_call_and_disabled_when_it_fails(monkeypatch, caplog, behaviour):
    fake = FakeFused(behaviour)
    monkeypatch.setattr(sparse, "_kitchen", lambda: fake)
    monkeypatch.setattr(sparse, "FUSED_DISABLED", {})
    monkeypatch.setattr(sparse, "_fused_checked", {})
    caplog.set_level(logging.WARNING, logger="ditfastattn")
    q, k, v = (t.to(torch.bfloat16) for t in qkv(LONG.seq_len, dim=128))
    want = sparse._reference()(*(t.transpose(1, 2) for t in (q, k, v)), topk_ratio=sparse.TOPK_RATIO,
                               sink_blocks=[0, 1], sink_q=[0, 1]).transpose(1, 2)
    for _ in range(2):
        torch.testing.assert_close(sparse.sol_attention(q, k, v, LONG), want)
    if behaviour == "ok":
        assert fake.calls == 3 and not sparse.FUSED_DISABLED, "checked once, then used"
    else:
        assert fake.calls == 1 and sparse.FUSED_DISABLED, "disabled by its check, never called again"
        assert sum("fused kernel disabled" in r.getMessage() for r in caplog.records) == 1
    q32 = q.float()
    assert "head dim 128" in sparse.fused_refusal(q32[..., :64])


# --- calibration -----------------------------------------------------------------------------

def _choose(cal, layout, steps=2):
    state = RunState()
    q, k, v = qkv(layout.seq_len)
    for s in range(steps):
        cal.begin_step(s)
        cal.attention(q, k, v, 0, ctx(s, layout), state, dense=DENSE)
        cal.end_step(s)
    return cal.rows[steps - 1][0]


@needs_kitchen
@pytest.mark.parametrize("cls", [FastCalibrator, GuidedCalibrator])
def test_calibration_takes_sol_attn_where_it_saves_and_never_where_it_does_not(cls):
    assert _choose(cls(layers=1, delta=100.0, has_cfg=True, candidates=(S,)), LONG) is S
    short = TokenLayout(seq_len=68, image_start=4, grid=(8, 8))
    assert _choose(cls(layers=1, delta=100.0, has_cfg=True, candidates=(S,)), short) is F, \
        "exact everywhere on 68 tokens: no gain, so never chosen"


def test_paper_mode_tries_sol_attn_last():
    """Paper mode does not see the calls, so it cannot weigh Sol-Attn's cost there: last."""
    tried = []

    def forward(row, write):
        tried.append(row[0])
        return torch.ones(4) if row[0] in (F, S) else torch.zeros(4)

    cal = PaperCalibrator(layers=1, delta=0.5, has_cfg=True, candidates=(Strategy.ASC, S, Strategy.WA_RS))
    if S not in cal.candidates:
        pytest.skip("comfy-kitchen without sol_attn here (< 0.2.40)")
    cal.calibrate_step(0, forward)
    tried.clear()
    cal.calibrate_step(1, forward)
    assert tried == [F, Strategy.WA_RS, Strategy.ASC, S, S], "reference, then the table's order, then the row"
    assert cal.rows[1] == [S]


@pytest.mark.parametrize("layout,cfg,expected", [
    # 4096 image tokens: Sol-Attn ~0.31, band window 0.25: after WA-RS (0.25), before ASC (0.5)
    (TokenLayout.image_only((64, 64)), True, (Strategy.AST, Strategy.WA_RS_ASC, Strategy.WA_RS, S, Strategy.ASC)),
    # 260 tokens (the 256-token demo models): Sol-Attn ~0.9 costs more than ASC: last
    (TokenLayout(seq_len=260, image_start=4, grid=(16, 16)), True,
     (Strategy.AST, Strategy.WA_RS_ASC, Strategy.WA_RS, Strategy.ASC, S)),
])
def test_fast_and_guided_mode_try_sol_attn_at_its_cost(layout, cfg, expected):
    from ditfastattn_core.calibrate import trial_order
    from ditfastattn_core.strategies import CANDIDATE_ORDER

    candidates = tuple(c for c in CANDIDATE_ORDER if c is not Strategy.WA)
    assert trial_order(candidates, ctx(1, layout), cfg) == expected
    assert trial_order(candidates[:-1], ctx(1, layout), cfg) == candidates[:-1], "the paper's order as it was"


def test_without_comfy_kitchen_sol_attn_is_no_candidate(monkeypatch, caplog):
    monkeypatch.setattr(sparse, "_reference", lambda: None)
    caplog.set_level(logging.WARNING, logger="ditfastattn")
    from ditfastattn_core import calibrate

    calibrate._say_unavailable.cache_clear()
    cal = GuidedCalibrator(layers=1, delta=1.0, has_cfg=True, candidates=(Strategy.AST, S))
    assert cal.candidates == (Strategy.AST,)
    GuidedCalibrator(layers=1, delta=1.0, has_cfg=True, candidates=(S,))
    assert sum("Sol-Attn is not a calibration candidate" in r.getMessage() for r in caplog.records) == 1
    default = GuidedCalibrator(layers=1, delta=1.0, has_cfg=True)
    assert S not in default.candidates
    assert sum("Sol-Attn" in r.getMessage() for r in caplog.records) == 1, "not a default: nothing more to say"


def test_cache_memory_of_a_plan_with_sol_attn():
    """Letter S keeps nothing of its own: only the output a following AST step reuses."""
    from ditfastattn_core.cache_memory import AttentionSize

    def plan(letters):
        return Plan(schedule=Schedule.from_letters(letters), family="flux", sigmas=(1.0, 0.6, 0.3, 0.0), cfg=4.0,
                    grid=(64, 64), attention=AttentionSize(4096, 128))

    assert plan(["FF", "SS", "SS"]).cache_estimate().peak_bytes == plan(["FF", "FF", "FF"]).cache_estimate().peak_bytes
    assert plan(["FF", "SS", "TT"]).cache_estimate().peak_bytes == plan(["FF", "FF", "TT"]).cache_estimate().peak_bytes


def test_the_reference_running_out_of_memory_is_a_dense_call_not_a_crash(monkeypatch):
    """The eager reference holds the dense scores in float32; out of memory there is its own
    failure, not the model's: that call runs dense, counted."""
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError

    def hungry(*a, **kw):
        raise oom("CUDA out of memory (stand-in)")

    monkeypatch.setattr(sparse, "_reference", lambda: hungry)
    q, k, v = qkv(LONG.seq_len)
    state = RunState(Schedule.from_letters(["F", "S"]))
    assert torch.equal(attend(q, k, v, S, 0, ctx(1, LONG), state), DENSE(q, k, v))
    assert state.stats["sparse_failed"] == 2
