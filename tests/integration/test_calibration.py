"""Calibrate FastAttn Plan in real ComfyUI, every mode, on tiny models."""

from __future__ import annotations

import pytest
import torch

from ditfastattn_core import Plan, Strategy
from ditfastattn_core.comfy_bridge import apply_fastattn
from ditfastattn_core.comfy_bridge.calibration import CalibrationRequest, calibrate
from ditfastattn_core.state import RunState

from .tiny import flux, pixart


@pytest.fixture(scope="module", params=["flux", "pixart"])
def tiny(request):
    return {"flux": flux, "pixart": pixart}[request.param]()


def run(tiny, **kw):
    req = CalibrationRequest(seed=0, steps=kw.pop("steps", 4), cfg=3.0, sampler_name="euler", scheduler="normal", **kw)
    return calibrate(tiny.patcher, tiny.positive, tiny.negative, {"samples": tiny.latent}, req)


@pytest.mark.parametrize("mode", ["paper", "fast", "guided"])
def test_huge_delta_compresses_everything_tiny_delta_nothing(tiny, mode):
    loose = run(tiny, mode=mode, delta=100.0)
    assert loose.plan.schedule[0] == (Strategy.FULL,) * loose.plan.layers
    assert all(s is Strategy.AST for row in loose.plan.schedule.rows[1:] for s in row)
    strict = run(tiny, mode=mode, delta=1e-12)
    # A tiny delta keeps only choices whose error vanishes in float32 (at the last, tiny sigma
    # of a random-weight model even ASC can); most of the plan stays FULL.
    assert strict.plan.cost().attention_flops > 0.5 > loose.plan.cost().attention_flops, (
        strict.plan.schedule.to_letters())


@pytest.mark.parametrize("mode", ["paper", "fast", "guided"])
def test_calibrated_plan_reproduces_the_calibration_run(tiny, mode):
    """The latent calibration returns is the compressed trajectory: applying the plan it made
    to the same inputs gives the same result."""
    import comfy.sample

    result = run(tiny, mode=mode, delta=0.3, candidates=(Strategy.WA_RS, Strategy.ASC, Strategy.WA_RS_ASC))
    plan = Plan.loads(result.plan.dumps())
    assert plan.cost().attention_flops < 1.0, result.summary()
    noise = comfy.sample.prepare_noise(tiny.latent, 0)
    again = comfy.sample.sample(apply_fastattn(tiny.patcher, plan), noise, 4, 3.0, "euler", "normal",
                                tiny.positive, tiny.negative, tiny.latent, seed=0, disable_pbar=True)
    torch.testing.assert_close(again, result.samples, rtol=1e-4, atol=1e-4)


def test_paper_trial_forwards_do_not_write_caches(tiny, monkeypatch):
    import contextlib

    def snapshot(state):
        entries = {name: {k: (e.step, e.tensor) for k, e in getattr(state, name).items()}
                   for name in ("residuals", "shared_cond")}
        entries["outputs"] = {(k, step): (step, t) for k, per_step in state.outputs.items()
                              for step, t in per_step.items()}
        return {name: {k: (step, t.data_ptr(), t.clone()) for k, (step, t) in d.items()}
                for name, d in entries.items()}

    trials = []
    original_read_only = RunState.read_only

    @contextlib.contextmanager
    def read_only(self):
        before = snapshot(self)
        with original_read_only(self):
            yield
        after = snapshot(self)
        assert before.keys() == after.keys()
        for name in before:
            assert before[name].keys() == after[name].keys(), name
            for key, (step, ptr, value) in before[name].items():
                assert after[name][key][:2] == (step, ptr) and torch.equal(after[name][key][2], value)
        trials.append(1)

    monkeypatch.setattr(RunState, "read_only", read_only)
    run(tiny, mode="paper", delta=0.2)
    assert len(trials) > 3, "the reference and the trials ran read-only"


def test_bad_requests_are_refused():
    with pytest.raises(ValueError, match="delta"):
        CalibrationRequest(seed=0, steps=4, cfg=3.0, sampler_name="euler", scheduler="normal", delta=0)
    with pytest.raises(ValueError, match="cfg = 1"):
        CalibrationRequest(seed=0, steps=4, cfg=1.0, sampler_name="euler", scheduler="normal",
                           candidates=(Strategy.ASC,))


def test_cancel_mid_calibration_leaves_no_state(tiny):
    from ditfastattn_core.comfy_bridge.keys import RUN_KEY

    ticks = []

    def cancel(done, total):
        ticks.append(1)
        if len(ticks) == 3:
            raise InterruptedError("cancelled")

    req = CalibrationRequest(seed=0, steps=4, cfg=3.0, sampler_name="euler", scheduler="normal", mode="paper")
    with pytest.raises(InterruptedError):
        calibrate(tiny.patcher, tiny.positive, tiny.negative, {"samples": tiny.latent}, req, on_progress=cancel)
    assert RUN_KEY not in tiny.patcher.model_options.get("transformer_options", {})
    assert not tiny.patcher.object_patches


@pytest.mark.skipif(not __import__("ditfastattn_core.sparse").sparse.available(),
                    reason="comfy-kitchen without sol_attn here (< 0.2.40): letter S is no candidate")
def test_sol_attn_is_chosen_only_where_it_saves_and_the_plan_reproduces_the_run(tiny):
    """PixArt's 320 image tokens are 5 Sol-Attn blocks: it saves there, and the plan applied
    gives the calibration run's latent. Flux's 104 tokens are 2 blocks, every one exact: it saves
    nothing, so it is never chosen (and its switch changes nothing there)."""
    import comfy.sample

    result = run(tiny, mode="guided", delta=100.0, candidates=(Strategy.SPARSE,))
    counts = result.plan.schedule.counts()
    if tiny.family == "flux":
        assert Strategy.SPARSE not in counts, result.plan.schedule.to_letters()
        return
    assert counts[Strategy.SPARSE] == (result.plan.steps - 1) * result.plan.layers
    plan = Plan.loads(result.plan.dumps())
    assert plan.cost().attention_flops < 1.0 and "Sol-Attn" in result.summary()
    noise = comfy.sample.prepare_noise(tiny.latent, 0)
    again = comfy.sample.sample(apply_fastattn(tiny.patcher, plan), noise, 4, 3.0, "euler", "normal",
                                tiny.positive, tiny.negative, tiny.latent, seed=0, disable_pbar=True)
    torch.testing.assert_close(again, result.samples, rtol=1e-4, atol=1e-4)
