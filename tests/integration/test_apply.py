"""Apply FastAttn in real ComfyUI on tiny models of several DiT families."""

from __future__ import annotations

import logging

import pytest
import torch

from ditfastattn_core import Plan, Schedule, Strategy, WindowSpec
from ditfastattn_core.comfy_bridge import PlanMismatchError, apply_fastattn, detect_family, layer_count
from ditfastattn_core.comfy_bridge.families import OVERRIDE

from .tiny import BUILDERS, flat, noise_like, repeat_batch, with_counting_override

STEPS = 4


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def tiny(request):
    return BUILDERS[request.param]()


def sample(tiny, model=None, *, negative=None, sampler="euler", steps=STEPS, cfg=3.0, callback=None, seed=0):
    import comfy.sample

    latent = tiny.latent
    return flat(comfy.sample.sample(
        model or tiny.patcher, noise_like(latent, seed), steps, cfg, sampler, "normal", tiny.positive,
        negative if negative is not None else tiny.negative, latent, seed=seed, disable_pbar=True,
        callback=callback,
    ))


def plan_for(tiny, rows: list[str], window: WindowSpec | None = None) -> Plan:
    family = detect_family(tiny.patcher.model)
    return Plan(schedule=Schedule.from_letters(rows), family=family.name,
                sigmas=tuple(float(STEPS - i) for i in range(STEPS + 1)), cfg=3.0,
                window=window or WindowSpec())


def uniform(tiny, letter: str) -> list[str]:
    layers = layer_count(tiny.patcher.model, detect_family(tiny.patcher.model))
    return ["F" * layers] + [letter * layers] * (STEPS - 1)


def run_stats(caplog) -> dict[str, int]:
    return parse_run_stats([r.getMessage() for r in caplog.records])


def parse_run_stats(messages: list[str]) -> dict[str, int]:
    """The counters of the last "FastAttn run: ..." line among the log messages."""
    lines = [m for m in messages if m.startswith("FastAttn run: ")]
    assert lines, f"the run logged no statistics: {messages[-5:]}"
    return {k: int(v) for k, v in (p.rsplit(" ", 1) for p in lines[-1][len("FastAttn run: "):].split(", "))}


@pytest.mark.parametrize("separate_cfg", [False, True])
def test_all_full_plan_is_bit_identical(tiny, separate_cfg):
    negative = tiny.negative_other_length if separate_cfg else tiny.negative
    plain = sample(tiny, negative=negative)
    patched = sample(tiny, apply_fastattn(tiny.patcher, plan_for(tiny, uniform(tiny, "F"))), negative=negative)
    assert torch.equal(plain, patched)


@pytest.mark.parametrize("letter,action", [("W", "window"), ("X", "cfg_copy"), ("C", "cfg_copy"), ("T", "reuse")])
def test_each_strategy_runs_and_changes_the_output(tiny, letter, action, caplog):
    caplog.set_level(logging.INFO, logger="ditfastattn")
    plain = sample(tiny)
    out = sample(tiny, apply_fastattn(tiny.patcher, plan_for(tiny, uniform(tiny, letter))))
    assert torch.isfinite(out).all()
    assert not torch.equal(out, plain)
    stats = run_stats(caplog)
    assert stats.get(action, 0) > 0, stats
    assert stats.get("residual_miss", 0) == 0 and stats.get("ast_miss", 0) == 0, stats


def test_asc_across_separate_cond_and_uncond_calls(tiny, caplog):
    caplog.set_level(logging.INFO, logger="ditfastattn")
    out = sample(tiny, apply_fastattn(tiny.patcher, plan_for(tiny, uniform(tiny, "C"))),
                 negative=tiny.negative_other_length)
    assert torch.isfinite(out).all()
    stats = run_stats(caplog)
    # the uncond call either copies the cond output of the same step or computes it itself
    assert stats.get("cfg_copy", 0) + stats.get("asc_miss", 0) > 0, stats


def test_two_runs_in_a_row_and_bypass_leave_no_state(tiny):
    patched = apply_fastattn(tiny.patcher, plan_for(tiny, uniform(tiny, "W")))
    first = sample(tiny, patched)
    second = sample(tiny, patched)
    assert torch.equal(first, second)
    fresh_plain = sample(tiny)
    assert torch.equal(sample(tiny), fresh_plain), "the original model is untouched"
    assert not tiny.patcher.object_patches


def test_interrupted_run_then_fresh_run(tiny):
    patched = apply_fastattn(tiny.patcher, plan_for(tiny, uniform(tiny, "T")))
    expected = sample(tiny, patched)

    def interrupt(step, *args):
        if step == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sample(tiny, patched, callback=interrupt)
    assert torch.equal(sample(tiny, patched), expected)


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2s_ancestral"])
def test_multi_call_samplers_map_deterministically(tiny, sampler):
    patched = apply_fastattn(tiny.patcher, plan_for(tiny, uniform(tiny, "W")))
    a = sample(tiny, patched, sampler=sampler)
    b = sample(tiny, patched, sampler=sampler)
    assert torch.isfinite(a).all() and torch.equal(a, b)


def test_batch_of_three(tiny):
    tiny3 = type(tiny)(**{**tiny.__dict__, "latent": repeat_batch(tiny.latent, 3)})
    patched = apply_fastattn(tiny.patcher, plan_for(tiny, uniform(tiny, "X")))
    out = sample(tiny3, patched)
    assert out.shape[0] == 3 and torch.isfinite(out).all()


def test_preexisting_override_is_chained(tiny):
    if detect_family(tiny.patcher.model).attach != OVERRIDE:
        pytest.skip("PixArt's attention never reaches the override")
    base, seen = with_counting_override(tiny.patcher)
    plain = sample(tiny, base)
    calls = len(seen)
    seen.clear()
    patched = apply_fastattn(base, plan_for(tiny, uniform(tiny, "F")))
    assert torch.equal(sample(tiny, patched), plain)
    assert len(seen) == calls


def test_plan_for_another_model_is_refused(tiny):
    plan = plan_for(tiny, uniform(tiny, "F"))
    wrong_layers = Plan(schedule=Schedule.uniform(STEPS, plan.layers + 1), family=plan.family, sigmas=plan.sigmas)
    with pytest.raises(PlanMismatchError, match="attention layers"):
        apply_fastattn(tiny.patcher, wrong_layers)
    other = "flux" if plan.family != "flux" else "sd3"
    with pytest.raises(PlanMismatchError, match="recalibrate|load the plan"):
        apply_fastattn(tiny.patcher, Plan(schedule=plan.schedule, family=other, sigmas=plan.sigmas))


def test_wrong_step_count_is_refused_before_sampling(tiny):
    patched = apply_fastattn(tiny.patcher, plan_for(tiny, uniform(tiny, "W")))
    with pytest.raises(ValueError, match="calibrated for 4 steps"):
        sample(tiny, patched, steps=6)


def test_unsupported_model_is_refused():
    from ditfastattn_core.comfy_bridge import UnsupportedModelError

    class NotADiT:
        pass

    class Patcher:
        model = NotADiT()

    with pytest.raises(UnsupportedModelError, match="not a diffusion transformer"):
        apply_fastattn(Patcher(), Plan(schedule=Schedule.uniform(1, 1), family="flux", sigmas=(1.0, 0.0)))


def test_strategy_letters_used_are_known():
    assert {s.letter for s in Strategy} == set("FWCXTAS")


def test_every_self_attention_layer_is_routed_once_per_step(tiny, caplog):
    """Exact counts: step 0 computes all layers densely (refreshing residuals), the other steps
    run every layer windowed, for both CFG rows; nothing else is touched or missed."""
    caplog.set_level(logging.INFO, logger="ditfastattn")
    layers = layer_count(tiny.patcher.model, detect_family(tiny.patcher.model))
    sample(tiny, apply_fastattn(tiny.patcher, plan_for(tiny, uniform(tiny, "W"))))
    stats = run_stats(caplog)
    assert stats == {"dense": layers * 2, "window": (STEPS - 1) * layers * 2}


def test_a_plan_for_other_settings_is_explained_once(tiny, caplog):
    caplog.set_level(logging.WARNING, logger="ditfastattn")
    plan = plan_for(tiny, uniform(tiny, "F"))
    other = Plan(schedule=plan.schedule, family=plan.family, sigmas=plan.sigmas, grid=(3, 5), window=plan.window)
    sample(tiny, apply_fastattn(tiny.patcher, other))
    messages = [r.getMessage() for r in caplog.records]
    assert sum("token grid" in m for m in messages) == 1, messages
    assert sum("noise schedule differs" in m for m in messages) == 1, messages


@pytest.mark.parametrize("separate_cfg", [False, True])
def test_pixart_ast_reuses_the_whole_attention_module(separate_cfg, caplog):
    """Where the pack owns the attention module (PixArt), AST reuses the module's output: the
    QKV and output projections are skipped, and the output is exactly the previous step's."""
    caplog.set_level(logging.INFO, logger="ditfastattn")
    tiny = BUILDERS["pixart"]()
    attn = tiny.patcher.model.diffusion_model.blocks[1].attn
    outs, projections = [], []
    hooks = [attn.register_forward_hook(lambda m, a, o: outs.append(o.detach().clone())),
             attn.qkv.register_forward_hook(lambda m, a, o: projections.append("qkv")),
             attn.proj.register_forward_hook(lambda m, a, o: projections.append("proj"))]
    try:
        sample(tiny, apply_fastattn(tiny.patcher, plan_for(tiny, ["FFF", "TTT", "FFF", "TTT"])),
               negative=tiny.negative_other_length if separate_cfg else None)
    finally:
        for h in hooks:
            h.remove()
    calls = 2 if separate_cfg else 1  # model calls per step
    assert len(outs) == STEPS * calls
    assert projections == ["qkv", "proj"] * (2 * calls), "projections run at the two FULL steps only"
    for step in (1, 3):
        for i in range(calls):
            assert torch.equal(outs[step * calls + i], outs[(step - 1) * calls + i])
    assert run_stats(caplog)["reuse"] == 2 * 3 * 2, "2 AST steps x 3 layers x 2 CFG chunks"


def test_pixart_module_reuse_samples_what_attention_reuse_does(monkeypatch, caplog):
    """Reusing the module output equals reusing the attention output and projecting it again
    (the projection is the same linear map): the sample agrees to float rounding."""
    from ditfastattn_core.comfy_bridge.run import Run

    caplog.set_level(logging.INFO, logger="ditfastattn")
    tiny = BUILDERS["pixart"]()
    plan = plan_for(tiny, ["FFF", "TTF", "FTT", "TTT"])
    by_module = sample(tiny, apply_fastattn(tiny.patcher, plan))
    stats = run_stats(caplog)
    assert stats["reuse"] == 7 * 2 and "ast_miss" not in stats, "every AST layer, twice AST in a row included"
    original = Run.__init__

    def attention_outputs_only(self, *args, **kwargs):
        original(self, *args, **{**kwargs, "module_outputs": False})

    monkeypatch.setattr(Run, "__init__", attention_outputs_only)
    by_attention = sample(tiny, apply_fastattn(tiny.patcher, plan))
    plain = sample(tiny)
    torch.testing.assert_close(by_module, by_attention, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(by_module, plain, atol=1e-4), "the plan changed the sample"
