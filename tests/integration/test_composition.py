"""Apply FastAttn next to other things users put in the same graph."""

from __future__ import annotations

import logging

import pytest
import torch

from ditfastattn_core.comfy_bridge import apply_fastattn
from ditfastattn_core.comfy_bridge.apply import ApplyRun

from .test_apply import STEPS, plan_for, run_stats, sample, uniform
from .tiny import flux, pixart


@pytest.fixture(scope="module", params=["flux", "pixart"])
def tiny(request):
    return {"flux": flux, "pixart": pixart}[request.param]()


def _first_linear_weight(patcher) -> str:
    for name, p in patcher.model.named_parameters():
        if name.startswith("diffusion_model.") and name.endswith(".weight") and p.dim() == 2:
            return name
    raise AssertionError("no linear weight")


def test_lora_style_weight_patch_still_applies(tiny):
    key = _first_linear_weight(tiny.patcher)
    weight = tiny.patcher.model.get_parameter(key)
    lora = tiny.patcher.clone()
    lora.add_patches({key: (torch.randn(weight.shape, generator=torch.Generator().manual_seed(3)) * 0.05,)})
    with_lora = sample(tiny, lora)
    assert not torch.equal(with_lora, sample(tiny)), "the weight patch changes the output"
    patched = apply_fastattn(lora, plan_for(tiny, uniform(tiny, "F")))
    assert torch.equal(sample(tiny, patched), with_lora)


def test_a_cfg_function_patch_still_applies(tiny):
    calls = []

    def cfg_fn(args):
        calls.append(1)
        return args["uncond"] + (args["cond"] - args["uncond"]) * args["cond_scale"] * 0.5

    other = tiny.patcher.clone()
    other.set_model_sampler_cfg_function(cfg_fn)
    expected = sample(tiny, other)
    n = len(calls)
    out = sample(tiny, apply_fastattn(other, plan_for(tiny, uniform(tiny, "F"))))
    assert torch.equal(out, expected) and len(calls) == 2 * n


def test_override_set_after_ours_is_chained_not_lost(tiny, caplog):
    if tiny.family == "pixart":
        pytest.skip("PixArt uses attention module patches, not the override")
    caplog.set_level(logging.INFO, logger="ditfastattn")
    seen = []

    def later(func, *args, **kwargs):
        seen.append(1)
        return func(*args, **kwargs)

    patched = apply_fastattn(tiny.patcher, plan_for(tiny, uniform(tiny, "W"))).clone()
    patched.model_options["transformer_options"]["optimized_attention_override"] = later
    out = sample(tiny, patched)
    assert torch.isfinite(out).all()
    assert seen, "the later override still runs"
    assert run_stats(caplog).get("window", 0) > 0, "and FastAttn is still in place"


def test_caches_are_empty_after_the_run(tiny, monkeypatch):
    finished = []
    original = ApplyRun.finish

    def spy(self):
        assert self.state.cache_bytes() > 0 or self.plan.schedule.counts()
        original(self)
        finished.append(self.state.cache_bytes())

    monkeypatch.setattr(ApplyRun, "finish", spy)
    sample(tiny, apply_fastattn(tiny.patcher, plan_for(tiny, ["F" * 3 if tiny.family == "pixart" else "F" * 4] + [
        ("T" if i % 2 else "W") * (3 if tiny.family == "pixart" else 4) for i in range(STEPS - 1)])))
    assert finished == [0]


def test_easycache_skipped_calls_are_cache_misses_not_stale_reuse(tiny, caplog, monkeypatch):
    from comfy_extras.nodes_easycache import EasyCacheNode

    from ditfastattn_core import Plan, Schedule
    from ditfastattn_core.state import RunState

    if tiny.family == "pixart":
        pytest.skip("EasyCache wraps the diffusion model of families that have DIFFUSION_MODEL wrappers")
    caplog.set_level(logging.INFO, logger="ditfastattn")
    reused = []
    original = RunState.previous_output

    def spy(self, step, key, shape):
        out = original(self, step, key, shape)
        if out is not None:  # the tensor the step right before stored, never an older one
            stored = self.outputs[key].get(step - 1)
            reused.append((step, step - 1 if stored is out else None))
        return out

    monkeypatch.setattr(RunState, "previous_output", spy)
    steps = 10
    easy = EasyCacheNode.execute(tiny.patcher, 0.05, 0.0, 1.0, False)[0]
    plan = Plan(schedule=Schedule.from_letters(["F" * 4] + ["T" * 4] * (steps - 1)), family="flux",
                sigmas=tuple(float(steps - i) for i in range(steps + 1)))
    out = sample(tiny, apply_fastattn(easy, plan), steps=steps)
    assert torch.isfinite(out).all()
    stats = run_stats(caplog)
    assert stats.get("ast_skipped_step", 0) > 0, f"EasyCache skipped calls, so some AST steps must miss: {stats}"
    assert "ast_miss" not in stats, "each miss is counted under its reason"
    assert reused and all(src == step - 1 for step, src in reused), reused
    explained = [r.getMessage() for r in caplog.records if "EasyCache skipped it" in r.getMessage()]
    assert len(explained) == 1 and f"{stats['ast_skipped_step']} layer calls ran FULL" in explained[0], explained
