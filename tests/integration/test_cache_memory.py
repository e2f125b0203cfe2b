"""Cache memory in real ComfyUI: the plan records its attention size at calibration, Apply
FastAttn states the peak before sampling, a sampling run holds exactly that, and caches kept
in CPU memory sample the same latents."""

from __future__ import annotations

import dataclasses
import logging
import random

import pytest
import torch

from ditfastattn_core import AttentionSize, CachePlacement, Schedule
from ditfastattn_core.cache_memory import format_bytes
from ditfastattn_core.comfy_bridge import apply_fastattn
from ditfastattn_core.comfy_bridge.apply import ApplyRun
from ditfastattn_core.comfy_bridge.calibration import CalibrationRequest, calibrate

from .test_apply import STEPS, sample
from .tiny import flux, pixart


@pytest.fixture(scope="module", params=["flux", "pixart"])
def tiny(request):
    return {"flux": flux, "pixart": pixart}[request.param]()


@pytest.fixture(scope="module")
def calibrated(tiny):
    """A plan calibrated on ``tiny`` (it records the attention size and grid)."""
    req = CalibrationRequest(seed=0, steps=STEPS, cfg=3.0, sampler_name="euler", scheduler="normal")
    return calibrate(tiny.patcher, tiny.positive, tiny.negative, {"samples": tiny.latent}, req).plan


def with_rows(plan, seed: int):
    """``plan`` with a random compressing strategy table (FULL first), to exercise every cache."""
    rng = random.Random(seed)
    rows = ["F" * plan.layers] + ["".join(rng.choice("FWCXT") for _ in range(plan.layers))
                                  for _ in range(plan.steps - 1)]
    return dataclasses.replace(plan, schedule=Schedule.from_letters(rows))


@pytest.fixture
def finished_runs(monkeypatch):
    runs = []
    original = ApplyRun.finish

    def spy(self):
        stats = original(self)
        runs.append(self)
        return stats

    monkeypatch.setattr(ApplyRun, "finish", spy)
    return runs


def test_calibration_records_the_attention_size(tiny, calibrated):
    dit = tiny.patcher.model.diffusion_model
    width = dit.hidden_size
    image_tokens = calibrated.grid[0] * calibrated.grid[1]
    assert calibrated.attention.width == width
    if tiny.family == "pixart":
        assert calibrated.attention.tokens == image_tokens  # self-attention over the image only
    else:
        assert calibrated.attention.tokens == image_tokens + tiny.positive[0][0].shape[1]  # joint: text + image


@pytest.mark.parametrize("seed", range(3))
def test_a_run_holds_exactly_the_estimated_peak(tiny, calibrated, finished_runs, seed):
    plan = with_rows(calibrated, seed)
    sample(tiny, apply_fastattn(tiny.patcher, plan))
    (run,) = finished_runs
    assert run.estimate is not None and run.estimate.peak_bytes > 0
    assert run.peak_cache_bytes == run.estimate.peak_bytes
    assert run.estimate == plan.cache_estimate(batch=tiny.latent.shape[0], dtype=torch.float32)


def test_cpu_placement_samples_the_same_latents(tiny, calibrated, finished_runs):
    plan = with_rows(calibrated, 0)
    on_device = sample(tiny, apply_fastattn(tiny.patcher, plan))
    on_cpu = sample(tiny, apply_fastattn(tiny.patcher, plan, cache_placement=CachePlacement.CPU))
    assert torch.equal(on_device, on_cpu)
    device_run, cpu_run = finished_runs
    assert cpu_run.state.placement is CachePlacement.CPU
    assert cpu_run.peak_cache_bytes == device_run.peak_cache_bytes > 0


def as_loaded(pack, plan):
    """``plan`` as the pack's own Load Plan node gives it (the pack is a second copy of the code)."""
    return pack["DiTFastAttn_LoadPlan"].execute("(none)", plan.dumps(indent=None)).result[0]


def test_apply_node_states_the_cache_memory(pack, tiny, calibrated, caplog):
    caplog.set_level(logging.INFO, logger="ditfastattn")
    node = pack["DiTFastAttn_Apply"]
    plan = as_loaded(pack, with_rows(calibrated, 1))
    estimate = plan.cache_estimate(dtype=torch.float32)
    assert estimate.peak_bytes > 0
    out = node.execute(tiny.patcher, plan, "auto", "strict")
    summary = out.ui["ditfastattn_plan"][0]["summary"]
    assert f"{estimate.describe()}, at the plan's size" in summary and "batch 1" in summary

    latent = {"samples": torch.zeros(3, *tiny.latent.shape[1:])}
    out = node.execute(tiny.patcher, plan, "auto", "strict", cache_placement="cpu", latent=latent)
    summary = out.ui["ditfastattn_plan"][0]["summary"]
    assert f"caches: peak {format_bytes(3 * estimate.peak_bytes)} in CPU memory" in summary
    assert f"for the latent {list(latent['samples'].shape)}" in summary

    sample(tiny, out.args[0])
    logged = [r.getMessage() for r in caplog.records if "caches" in r.getMessage()]
    assert any(m.startswith("FastAttn caches: peak") for m in logged), logged
    assert any(m.startswith("FastAttn caches held at most") for m in logged), logged


def test_a_plan_without_its_attention_size_says_so(pack, tiny, calibrated):
    plan = dataclasses.replace(with_rows(calibrated, 1), attention=None)
    out = pack["DiTFastAttn_Apply"].execute(tiny.patcher, as_loaded(pack, plan), "auto", "strict")
    assert "caches: size unknown" in out.ui["ditfastattn_plan"][0]["summary"]


def test_attention_size_scales_to_the_run_latent(calibrated):
    grid = tuple(2 * g for g in calibrated.grid)
    bigger = calibrated.attention.at_grid(calibrated.grid, grid)
    assert bigger == AttentionSize(calibrated.attention.tokens + 3 * calibrated.grid[0] * calibrated.grid[1],
                                   calibrated.attention.width)


def test_the_shipped_demo_plan_estimates_what_the_demo_model_holds(finished_runs):
    """The demo plan's recorded attention size (4 class tokens + 8 x 8 image tokens, width 128)
    is the demo model's: the estimate is what a run holds."""
    from pathlib import Path

    from demo_model import CLASS_EMBEDDINGS_FILE
    from demo_model.comfy_io import load_demo_dit, sample_classes
    from demo_model.conditioning import load_class_embeddings
    from ditfastattn_core import Plan

    shipped = Path(__file__).resolve().parents[2] / "plans" / "ditfastattn_demo.json"
    plan = Plan.loads(shipped.read_bytes())
    assert plan.attention == AttentionSize(4 + 64, 128)
    sample_classes(apply_fastattn(load_demo_dit(), plan), load_class_embeddings(CLASS_EMBEDDINGS_FILE), [3, 8], seed=0)
    (run,) = finished_runs
    assert run.peak_cache_bytes == run.estimate.peak_bytes == plan.cache_estimate(batch=2, dtype=torch.float32).peak_bytes
    assert run.peak_cache_bytes > 0
