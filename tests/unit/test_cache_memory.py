"""The cache memory estimate (``cache_memory``) against what a real engine run holds, and caches
kept in CPU memory (``CachePlacement.CPU``)."""

import random

import pytest
import torch

from ditfastattn_core import (
    AttentionSize,
    CachePlacement,
    CallContext,
    Plan,
    PlanError,
    RunState,
    Schedule,
    Strategy,
    TokenLayout,
    WindowSpec,
    attend,
    estimate_cache_memory,
)
from ditfastattn_core.cache_memory import format_bytes
from ditfastattn_core.state import CacheKey

GRID = (6, 8)
TEXT = 5
HEADS, HEAD_DIM = 2, 4
BAND = WindowSpec()


def random_schedule(seed: int, steps: int = 9, layers: int = 4) -> Schedule:
    rng = random.Random(seed)
    rows = ["F" * layers] + ["".join(rng.choice("FWCXT") for _ in range(layers)) for _ in range(steps - 1)]
    return Schedule.from_letters(rows)


def sample(schedule: Schedule, batch: int, cfg: bool, placement=CachePlacement.DEVICE, window=BAND):
    """A real run of the engine over ``schedule``: [text, image] tokens, one call per step with
    both CFG branches; returns (the final outputs per layer, the state after the run)."""
    tokens = TokenLayout(TEXT + GRID[0] * GRID[1], image_start=TEXT, grid=GRID)
    branches = (0, 1) if cfg else (0,)
    g = torch.Generator().manual_seed(0)
    state = RunState(schedule, placement)
    outs = []
    for step in range(schedule.steps):
        state.begin_step(step)
        ctx = CallContext(step, branches, tokens, window)
        outs = []
        for layer in range(schedule.layers):
            q, k, v = (torch.randn(batch * len(branches), HEADS, tokens.seq_len, HEAD_DIM, generator=g)
                       for _ in range(3))
            outs.append(attend(q, k, v, schedule[step][layer], layer, ctx, state))
    state.note_peak()
    return outs, state


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("cfg", [True, False])
def test_estimate_is_the_peak_a_real_run_holds(seed, cfg):
    schedule = random_schedule(seed)
    batch = 3
    _, state = sample(schedule, batch, cfg, window=WindowSpec(dims=2, extent=(0.25, 0.25)))
    size = AttentionSize(TEXT + GRID[0] * GRID[1], HEADS * HEAD_DIM)
    estimate = estimate_cache_memory(schedule, size, batch=batch, cfg=cfg, dtype=torch.float32)
    assert state.peak_bytes > 0
    assert estimate.peak_bytes == state.peak_bytes
    assert estimate.entry_bytes == batch * size.tokens * size.width * 4


def test_reused_outputs_are_kept_once_across_an_ast_chain():
    """AST, AST, AST: the kept output is one tensor for all the steps (no copy per step)."""
    schedule = Schedule.from_letters(["F", "T", "T", "T", "F"])
    _, state = sample(schedule, 1, True)
    estimate = estimate_cache_memory(schedule, AttentionSize(TEXT + 48, HEADS * HEAD_DIM), cfg=True,
                                     dtype=torch.float32)
    assert estimate.peak_bytes == state.peak_bytes == 2 * estimate.entry_bytes  # one per CFG branch


def test_an_all_full_plan_caches_nothing():
    estimate = estimate_cache_memory(Schedule.uniform(10, 6), AttentionSize(100, 64))
    assert estimate.peak_bytes == 0


def test_estimate_scales_with_batch_tokens_width_and_dtype():
    schedule = random_schedule(1)
    base = estimate_cache_memory(schedule, AttentionSize(100, 64), batch=1, dtype=torch.float16)
    assert estimate_cache_memory(schedule, AttentionSize(100, 64), batch=2).peak_bytes == 2 * base.peak_bytes
    assert estimate_cache_memory(schedule, AttentionSize(300, 64)).peak_bytes == 3 * base.peak_bytes
    assert estimate_cache_memory(schedule, AttentionSize(100, 64), dtype=torch.float32).peak_bytes \
        == 2 * base.peak_bytes


def test_attention_size_at_another_grid_keeps_the_text_tokens():
    assert AttentionSize(77 + 64 * 64, 1152).at_grid((64, 64), (128, 96)) == AttentionSize(77 + 128 * 96, 1152)


def test_format_bytes():
    assert [format_bytes(n) for n in (12, 3 * 2**10, 5 * 2**20 + 2**19, 2**31)] == \
        ["12 B", "3.0 KiB", "5.5 MiB", "2.0 GiB"]


# --- caches in CPU memory -------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_cpu_placement_gives_the_same_outputs(seed):
    schedule = random_schedule(seed)
    on_device, device_state = sample(schedule, 2, True)
    on_cpu, cpu_state = sample(schedule, 2, True, placement=CachePlacement.CPU)
    for a, b in zip(on_device, on_cpu, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert cpu_state.stats == device_state.stats and not cpu_state.misses
    assert cpu_state.peak_bytes == device_state.peak_bytes


def test_cpu_placement_keeps_copies_and_hands_out_copies():
    """What the state keeps is its own copy (a later in-place write by the model cannot reach
    it), and what it hands out is a fresh tensor on the compute device."""
    state = RunState(Schedule.from_letters(["F", "W", "T"]), CachePlacement.CPU)
    out = torch.randn(2, 3)
    state.put_output(0, CacheKey(0, 0), out)
    state.put_residual(0, CacheKey(0, 0), out)
    kept = state.outputs[CacheKey(0, 0)][0]
    assert kept.data_ptr() != out.data_ptr() and kept.device.type == "cpu"
    out.add_(1.0)  # the model reuses its buffer
    got = state.previous_output(1, CacheKey(0, 0), out.shape)
    torch.testing.assert_close(got, out - 1.0)
    assert got.data_ptr() != kept.data_ptr() and got.device == state.device
    residual = state.residual(1, CacheKey(0, 0), out.shape)
    torch.testing.assert_close(residual, out - 1.0)
    assert residual.data_ptr() != state.residuals[CacheKey(0, 0)].tensor.data_ptr()


def test_device_placement_keeps_the_tensor_itself():
    state = RunState(Schedule.from_letters(["F", "T"]))
    out = torch.randn(2, 3)
    state.put_output(0, CacheKey(0, 0), out)
    assert state.previous_output(1, CacheKey(0, 0), out.shape) is out


# --- the plan records its attention size ------------------------------------------------------------


def _plan(**tokens) -> str:
    schedule = Schedule.from_letters(["FF", "WT"])
    plan = Plan(schedule=schedule, family="sd3", sigmas=(1.0, 0.5, 0.0), cfg=5.0, grid=(8, 8),
                attention=AttentionSize(68, 128))
    data = plan.to_json()
    data["tokens"] = {**data["tokens"], **tokens}
    return data


def test_plan_round_trips_its_attention_size_and_estimates_at_other_sizes():
    plan = Plan.from_json(_plan())
    assert plan.attention == AttentionSize(68, 128)
    at_plan = plan.cache_estimate(dtype=torch.float32)
    # step 1 reads layer 0's residual (W) and layer 1's output (T), each for both CFG branches
    assert at_plan.entry_bytes == 68 * 128 * 4 and at_plan.peak_bytes == 4 * at_plan.entry_bytes
    bigger = plan.cache_estimate((16, 16), batch=2, dtype=torch.float32)
    assert bigger.entry_bytes == 2 * (4 + 256) * 128 * 4


def test_plans_without_attention_size_load_and_estimate_nothing():
    data = _plan()
    del data["tokens"]["sequence"], data["tokens"]["width"]
    plan = Plan.from_json(data)
    assert plan.attention is None and plan.cache_estimate() is None


@pytest.mark.parametrize(("tokens", "message"), [
    ({"sequence": 10}, "tokens.sequence must be an integer in [64"),
    ({"width": 0}, "tokens.width must be an integer in [1"),
    ({"width": "128"}, "tokens.width must be an integer"),
    ({"grid": None}, "tokens.sequence and tokens.width need tokens.grid"),
])
def test_plan_attention_size_is_validated(tokens, message):
    with pytest.raises(PlanError, match=message.replace("[", r"\[")):
        Plan.from_json(_plan(**tokens))


@pytest.mark.parametrize("placement", list(CachePlacement))
def test_a_caller_writing_into_its_output_cannot_reach_the_cache(placement):
    """The model may reuse the attention output's buffer: with or without copies kept in CPU
    memory, the output handed to the caller is never the tensor the next step reuses."""
    state = RunState(Schedule.from_letters(["F", "T", "T"]), placement)
    tokens = TokenLayout.image_only(GRID)
    q, k, v = (torch.randn(2, HEADS, tokens.seq_len, HEAD_DIM, generator=torch.Generator().manual_seed(i))
               for i in range(3))
    outs = []
    for step, strategy in enumerate("FTT"):
        state.begin_step(step)
        out = attend(q, k, v, Strategy.from_letter(strategy), 0, CallContext(step, (0, 1), tokens, BAND), state)
        outs.append(out.clone())
        out.mul_(0.0)  # the caller reuses its buffer
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    torch.testing.assert_close(outs[2], outs[0], rtol=0, atol=0)
