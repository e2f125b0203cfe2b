"""Every sampler ComfyUI ships: compressed cells run compressed in every model call of their
step, and calibration's latent is the latent Apply(plan) produces with the same sampler."""

from __future__ import annotations

from dataclasses import dataclass

import comfy.samplers
import pytest
import torch

from ditfastattn_core import Plan, Schedule, Strategy
from ditfastattn_core.comfy_bridge import apply_fastattn, attention_hooks
from ditfastattn_core.comfy_bridge import run as bridge_run
from ditfastattn_core.comfy_bridge.calibration import CalibrationRequest, calibrate

from .tiny import pixart

STEPS = 4
EVERY_STRATEGY = ["FFF", "WXC", "TWX", "CTW"]
"""A plan for tiny PixArt (3 layers) holding every strategy, each reading a cache that the
step before it filled."""
SAMPLERS = list(comfy.samplers.KSampler.SAMPLERS)
MULTI_CALL = ["heun", "dpmpp_2s_ancestral"]


@pytest.fixture(scope="module")
def tiny():
    return pixart()


@dataclass
class SamplerCheck:
    sampler: str
    compressed_cells: int
    """Compressed (step, layer) cells of the plan that at least one model call reached."""
    ran_compressed: int
    """Of those, the cells that ran compressed in every call (no cache miss)."""
    misses: list


def _sample(tiny, model, sampler: str) -> torch.Tensor:
    import comfy.sample

    noise = comfy.sample.prepare_noise(tiny.latent, 0)
    return comfy.sample.sample(model, noise, STEPS, 3.0, sampler, "normal", tiny.positive, tiny.negative,
                               tiny.latent, seed=0, disable_pbar=True)


def _plan_sigmas(tiny, sampler: str) -> tuple[float, ...]:
    """The schedule a run with this sampler samples (what a calibrated plan would keep)."""
    ks = comfy.samplers.KSampler(tiny.patcher, steps=STEPS, device="cpu", sampler=sampler, scheduler="normal")
    return tuple(float(s) for s in ks.sigmas)


def check_sampler(tiny, sampler: str, monkeypatch) -> SamplerCheck:
    """Apply the every-strategy plan with ``sampler`` and record, per cell, whether each call
    that reached it ran its strategy (the run's miss counter did not move)."""
    calls: dict[tuple[int, int], list[bool]] = {}
    original = bridge_run.attend

    def spy(q, k, v, strategy, layer, ctx, state, **kw):
        before = state.misses
        out = original(q, k, v, strategy, layer, ctx, state, **kw)
        if strategy is not Strategy.FULL:
            calls.setdefault((ctx.step, layer), []).append(state.misses == before)
        return out

    reuse = attention_hooks.reuse_module_output

    def module_spy(strategy, layer, ctx, state, shape):
        out = reuse(strategy, layer, ctx, state, shape)
        if out is not None:  # AST served from the module's kept output (PixArt): compressed
            calls.setdefault((ctx.step, layer), []).append(True)
        return out  # None: the engine computes the cell, and the spy above records it

    monkeypatch.setattr(bridge_run, "attend", spy)
    monkeypatch.setattr(attention_hooks, "reuse_module_output", module_spy)
    plan = Plan(schedule=Schedule.from_letters(EVERY_STRATEGY), family="pixart",
                sigmas=_plan_sigmas(tiny, sampler), cfg=3.0)
    out = _sample(tiny, apply_fastattn(tiny.patcher, plan), sampler)
    monkeypatch.setattr(bridge_run, "attend", original)
    monkeypatch.setattr(attention_hooks, "reuse_module_output", reuse)
    assert torch.isfinite(out).all()
    misses = [cell for cell, ok in calls.items() if not all(ok)]
    return SamplerCheck(sampler, len(calls), len(calls) - len(misses), misses)


CALIBRATION = {
    # settings that give tiny PixArt mixed plans: CFG sharing, windows and step reuse
    "fast": dict(delta=0.05),
    "paper": dict(delta=0.3, candidates=(Strategy.WA_RS, Strategy.ASC)),
}


def calibrate_then_apply(tiny, sampler: str, mode: str) -> tuple[Plan, torch.Tensor, torch.Tensor]:
    request = CalibrationRequest(seed=0, steps=STEPS, cfg=3.0, sampler_name=sampler, scheduler="normal",
                                 mode=mode, **CALIBRATION[mode])
    result = calibrate(tiny.patcher, tiny.positive, tiny.negative, {"samples": tiny.latent}, request)
    plan = Plan.loads(result.plan.dumps())
    return plan, result.samples, _sample(tiny, apply_fastattn(tiny.patcher, plan), sampler)


# Samplers whose model calls never land on the schedule's sigmas (their own time grids):
# every call runs FULL, so no compressed cell is reached, and that is what the plan says.
OWN_TIME_GRID = {"dpm_fast", "dpm_adaptive"}


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_compressed_cells_run_compressed(tiny, sampler, monkeypatch):
    check = check_sampler(tiny, sampler, monkeypatch)
    assert check.misses == [], f"{sampler}: cells that fell back to FULL in some call: {check.misses}"
    if sampler not in OWN_TIME_GRID:
        assert check.compressed_cells == 9, check


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_fast_calibration_latent_is_what_apply_produces(tiny, sampler):
    plan, calibrated, applied = calibrate_then_apply(tiny, sampler, "fast")
    if sampler not in OWN_TIME_GRID:
        assert plan.cost().attention_flops < 1.0, plan.schedule.to_letters()
    assert torch.equal(applied, calibrated), (sampler, (applied - calibrated).abs().max())


@pytest.mark.parametrize("sampler", MULTI_CALL)
def test_paper_calibration_latent_is_what_apply_produces(tiny, sampler):
    plan, calibrated, applied = calibrate_then_apply(tiny, sampler, "paper")
    assert plan.cost().attention_flops < 1.0, plan.schedule.to_letters()
    assert torch.equal(applied, calibrated), (sampler, (applied - calibrated).abs().max())
