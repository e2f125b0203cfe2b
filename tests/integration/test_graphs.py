"""Graph shapes users build around Apply FastAttn: split sampling (KSamplerAdvanced ranges,
Wan 2.2's two experts), stacked patches, grad mode, and refusals that must come before the
first model call."""

from __future__ import annotations

import logging

import pytest
import torch

from ditfastattn_core import Plan, Schedule, WindowSpec
from ditfastattn_core.comfy_bridge import apply_fastattn
from ditfastattn_core.comfy_bridge import run as bridge_run
from ditfastattn_core.comfy_bridge.calibration import CalibrationRequest, calibrate
from ditfastattn_core.steps import StepCountError

from .test_apply import run_stats
from .tiny import pixart, sd3, wan, wan22, with_counting_override

STEPS = 4
BUILDERS = {"pixart": pixart, "sd3": sd3, "wan": wan}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def tiny(request):
    return BUILDERS[request.param]()


def layers_of(tiny) -> int:
    from ditfastattn_core.comfy_bridge import model_geometry

    return model_geometry(tiny.patcher).layers


def advanced(tiny, model, *, start=0, end=10000, add_noise=True, leftover=False, latent=None,
             sampler="euler", steps=STEPS, seed=0):
    """What KSamplerAdvanced does (nodes.common_ksampler) for these inputs."""
    import comfy.sample

    latent = tiny.latent if latent is None else latent
    noise = comfy.sample.prepare_noise(latent, seed) if add_noise else torch.zeros_like(latent)
    return comfy.sample.sample(model, noise, steps, 3.0, sampler, "normal", tiny.positive, tiny.negative, latent,
                               disable_noise=not add_noise, start_step=start, last_step=end,
                               force_full_denoise=not leftover, seed=seed, disable_pbar=True)


def schedule_sigmas(tiny, steps=STEPS, sampler="euler") -> tuple[float, ...]:
    import comfy.samplers

    ks = comfy.samplers.KSampler(tiny.patcher, steps=steps, device="cpu", sampler=sampler, scheduler="normal")
    return tuple(float(s) for s in ks.sigmas)


def plan_of(tiny, rows: list[str], sigmas=None, window: WindowSpec | None = None) -> Plan:
    from ditfastattn_core.comfy_bridge import model_geometry

    return Plan(schedule=Schedule.from_letters(rows), family=model_geometry(tiny.patcher).family,
                sigmas=sigmas or schedule_sigmas(tiny), cfg=3.0, window=window or WindowSpec())


def record_steps(monkeypatch) -> list:
    """The plan step of every model call (None: unmapped)."""
    steps = []
    original = bridge_run.Run.begin_call

    def spy(self, *args):
        call = original(self, *args)
        steps.append(call.step)
        return call

    monkeypatch.setattr(bridge_run.Run, "begin_call", spy)
    return steps


# --- split sampling -----------------------------------------------------------------------


@pytest.mark.parametrize("start,end", [(0, 2), (2, 10000), (1, 3)])
def test_a_whole_schedule_plan_applies_to_a_range_of_it_by_sigma(tiny, start, end, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="ditfastattn")
    n = layers_of(tiny)
    plan = plan_of(tiny, ["F" * n, "W" * n, "F" * n, "W" * n])
    steps = record_steps(monkeypatch)
    out = advanced(tiny, apply_fastattn(tiny.patcher, plan), start=start, end=end, leftover=end < STEPS)
    assert torch.isfinite(out).all()
    assert sorted(set(steps)) == list(range(start, min(end, STEPS))), "calls map to the plan's steps by sigma"
    stats = run_stats(caplog)
    if start in (0, 2):  # the range starts at a FULL step: every window step finds its residual
        assert stats.get("window", 0) > 0 and stats.get("residual_miss", 0) == 0, stats
    else:  # a range starting at a window step computes that step FULL (no residual yet), never stale
        assert stats.get("residual_miss", 0) > 0, stats


def test_a_split_run_equals_the_whole_run_when_the_plan_is_full_where_it_is_split(tiny):
    n = layers_of(tiny)
    model = apply_fastattn(tiny.patcher, plan_of(tiny, ["F" * n, "W" * n, "F" * n, "T" * n]))
    whole = advanced(tiny, model)
    first = advanced(tiny, model, end=2, leftover=True)
    split = advanced(tiny, model, start=2, add_noise=False, latent=first)
    plain_first = advanced(tiny, tiny.patcher, end=2, leftover=True)
    plain_split = advanced(tiny, tiny.patcher, start=2, add_noise=False, latent=plain_first)
    # splitting itself moves the result by float noise (latent scaling between the samplers)
    tolerance = (advanced(tiny, tiny.patcher) - plain_split).abs().max().item()
    assert (whole - split).abs().max().item() <= 2 * tolerance + 1e-6


def test_a_range_outside_the_plan_schedule_is_refused_before_the_first_model_call(tiny, monkeypatch):
    steps = record_steps(monkeypatch)
    n = layers_of(tiny)
    plan = plan_of(tiny, ["F" * n, "W" * n, "W" * n, "W" * n])
    with pytest.raises(StepCountError, match="not a range of the plan's schedule"):
        advanced(tiny, apply_fastattn(tiny.patcher, plan), steps=6, start=3)
    assert steps == []


def test_wan22_two_experts_one_plan_each_calibrated_in_that_graph():
    """Wan 2.2's graph: the high-noise expert samples steps 0-2 and returns leftover noise, the
    low-noise expert continues from step 2 without adding noise. Each expert gets its own plan,
    calibrated in that same graph; applying both reproduces the calibrated latent exactly."""
    high = wan22()
    low_patcher = high.patcher.clone()
    name = next(k for k, p in low_patcher.model.named_parameters() if k.endswith(".weight") and p.dim() == 2)
    weight = low_patcher.model.get_parameter(name)
    low_patcher.add_patches({name: (torch.randn(weight.shape, generator=torch.Generator().manual_seed(5)) * 0.05,)})
    split = 2

    def request(**kw):
        return CalibrationRequest(seed=0, steps=STEPS, cfg=3.0, sampler_name="euler", scheduler="normal",
                                  mode="fast", delta=0.3, **kw)

    latent = {"samples": high.latent}
    first = calibrate(high.patcher, high.positive, high.negative, latent,
                      request(end_step=split, return_with_leftover_noise=True))
    second = calibrate(low_patcher, high.positive, high.negative, {"samples": first.samples},
                       request(start_step=split, add_noise=False))
    assert first.plan.steps == split and second.plan.steps == STEPS - split
    assert first.plan.cost().attention_flops < 1 and second.plan.cost().attention_flops < 1

    out_high = advanced(high, apply_fastattn(high.patcher, first.plan), end=split, leftover=True)
    assert torch.equal(out_high, first.samples)
    out_low = advanced(high, apply_fastattn(low_patcher, second.plan), start=split, add_noise=False,
                       latent=out_high)
    assert torch.equal(out_low, second.samples)


# --- stacking -----------------------------------------------------------------------------


def test_a_second_apply_replaces_the_first_plan(tiny, caplog):
    caplog.set_level(logging.INFO, logger="ditfastattn")
    n = layers_of(tiny)
    window = plan_of(tiny, ["F" * n] + ["W" * n] * 3)
    sharing = plan_of(tiny, ["F" * n] + ["C" * n] * 3)
    expected = advanced(tiny, apply_fastattn(tiny.patcher, sharing))
    stacked = apply_fastattn(apply_fastattn(tiny.patcher, window), sharing)
    assert torch.equal(advanced(tiny, stacked), expected)
    assert run_stats(caplog) == {"dense": 3 * n, "cfg_copy": 3 * n}, "each attention layer once per call"
    assert torch.equal(advanced(tiny, apply_fastattn(stacked, window)),
                       advanced(tiny, apply_fastattn(tiny.patcher, window)))


def test_other_attention_overrides_stay_chained_under_stacked_applies(tiny):
    if tiny.family == "pixart":
        pytest.skip("PixArt's attention never reaches the override")
    base, seen = with_counting_override(tiny.patcher)
    n = layers_of(tiny)
    window = plan_of(tiny, ["F" * n] + ["W" * n] * 3)
    once = advanced(tiny, apply_fastattn(base, window))
    calls = len(seen)
    assert calls > 0
    seen.clear()
    twice = advanced(tiny, apply_fastattn(apply_fastattn(base, window), window))
    assert torch.equal(twice, once) and len(seen) == calls


def test_calibrate_on_a_patched_model_is_calibrate_on_the_model(tiny):
    n = layers_of(tiny)
    patched = apply_fastattn(tiny.patcher, plan_of(tiny, ["F" * n] + ["C" * n] * 3))
    req = CalibrationRequest(seed=0, steps=STEPS, cfg=3.0, sampler_name="euler", scheduler="normal", delta=0.3)
    on_plain = calibrate(tiny.patcher, tiny.positive, tiny.negative, {"samples": tiny.latent}, req)
    on_patched = calibrate(patched, tiny.positive, tiny.negative, {"samples": tiny.latent}, req)
    assert on_patched.plan.schedule == on_plain.plan.schedule
    assert torch.equal(on_patched.samples, on_plain.samples)


# --- grad mode ----------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["uni_pc", "euler"])
def test_grad_mode_on(tiny, sampler, caplog):
    """Scripts and API code call samplers outside inference_mode; uni_pc runs the model with
    grad mode on. Nothing the engine writes in place may be a tensor autograd tracks."""
    caplog.set_level(logging.INFO, logger="ditfastattn")
    n = layers_of(tiny)
    model = apply_fastattn(tiny.patcher, plan_of(tiny, ["F" * n, "W" * n, "X" * n, "T" * n],
                                                 sigmas=schedule_sigmas(tiny, sampler=sampler)))
    assert not torch.is_inference_mode_enabled()
    with torch.enable_grad():
        out = advanced(tiny, model, sampler=sampler)
    with torch.inference_mode():
        reference = advanced(tiny, model, sampler=sampler)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    assert run_stats(caplog).get("window", 0) > 0


# --- refusals before sampling -------------------------------------------------------------


def test_a_2d_window_plan_on_a_video_latent_is_refused_before_the_first_model_call(monkeypatch):
    video = wan()
    steps = record_steps(monkeypatch)
    n = layers_of(video)
    plan = plan_of(video, ["F" * n] + ["W" * n] * 3, window=WindowSpec(dims=2, extent=(0.125, 0.125)))
    with pytest.raises(ValueError, match="2D box window cannot be used on this latent.*video latent"):
        advanced(video, apply_fastattn(video.patcher, plan))
    assert steps == []


def test_calibrate_2d_window_presets_on_a_video_latent_are_refused_before_the_first_model_call(pack, monkeypatch):
    import sys

    video = wan()
    steps = record_steps(monkeypatch)
    windows = sys.modules[pack["DiTFastAttn_Calibrate"].__module__].WINDOWS
    for preset in ("2D box 1/8", "2D box 1/8, 8x8 tiles"):
        req = CalibrationRequest(seed=0, steps=STEPS, cfg=3.0, sampler_name="euler", scheduler="normal",
                                 window=windows[preset])
        with pytest.raises(ValueError, match="window cannot be used on this latent.*Calibrate FastAttn Plan"):
            calibrate(video.patcher, video.positive, video.negative, {"samples": video.latent}, req)
    assert steps == []


def test_a_kernel_this_machine_cannot_run_falls_back_with_one_line(tiny, caplog):
    from ditfastattn_core.kernels import _warn_fallback

    _warn_fallback.cache_clear()
    caplog.set_level(logging.INFO, logger="ditfastattn")
    n = layers_of(tiny)
    plan = plan_of(tiny, ["F" * n] + ["W" * n] * 3)
    out = advanced(tiny, apply_fastattn(tiny.patcher, plan, kernel="flash"))
    assert torch.equal(out, advanced(tiny, apply_fastattn(tiny.patcher, plan)))
    assert run_stats(caplog).get("window", 0) > 0
    lines = [r.getMessage() for r in caplog.records if "'flash'" in r.getMessage()]
    assert len(lines) == 1 and "using 'auto'" in lines[0], lines
