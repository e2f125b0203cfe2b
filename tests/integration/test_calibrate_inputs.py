"""Calibration samples exactly what KSampler samples: same latent size and noise."""

from __future__ import annotations

import inspect

import pytest
import torch

from ditfastattn_core.comfy_bridge.calibration import CalibrationRequest, calibrate

from .tiny import BUILDERS


class _Captured(Exception):
    pass


def _capture_sample_inputs(monkeypatch, run):
    """Run ``run`` and return the (noise, latent_image) it hands to comfy.sample.sample."""
    import comfy.sample

    seen = {}

    def fake_sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, **kw):
        seen["noise"], seen["latent"] = noise, latent_image
        raise _Captured

    monkeypatch.setattr(comfy.sample, "sample", fake_sample)
    with pytest.raises(_Captured):
        run()
    return seen["noise"], seen["latent"]


@pytest.mark.parametrize("latent", [
    {"samples": torch.zeros(2, 4, 8, 8), "batch_index": [3, 5]},
    {"samples": torch.zeros(1, 4, 8, 8), "downscale_ratio_spacial": 16},
    {"samples": torch.zeros(1, 4, 16, 16), "downscale_ratio_spacial": 4},
], ids=["batch_index", "ratio_16", "ratio_4"])
def test_calibrate_samples_what_ksampler_samples(monkeypatch, comfy_nodes, latent):
    tiny = BUILDERS["flux"]()
    seed = 11

    def ksampler():
        comfy_nodes.common_ksampler(tiny.patcher, seed, 3, 2.0, "euler", "normal", tiny.positive, tiny.negative,
                                    latent)

    def calibration():
        calibrate(tiny.patcher, tiny.positive, tiny.negative, latent,
                  CalibrationRequest(seed=seed, steps=3, cfg=2.0, sampler_name="euler", scheduler="normal"))

    k_noise, k_latent = _capture_sample_inputs(monkeypatch, ksampler)
    c_noise, c_latent = _capture_sample_inputs(monkeypatch, calibration)
    assert c_latent.shape == k_latent.shape and torch.equal(c_latent, k_latent)
    assert torch.equal(c_noise, k_noise)
    import comfy.sample

    knows_ratios = "downscale_ratio_spacial" in inspect.signature(comfy.sample.fix_empty_latent_channels).parameters
    if "downscale_ratio_spacial" in latent and knows_ratios:
        # a tree that knows the ratios resizes the empty latent to the model's own ratio (8)
        expected = latent["samples"].shape[-1] * latent["downscale_ratio_spacial"] // 8
        assert k_latent.shape[-1] == expected


def test_the_sol_attn_switch_is_appended_off_and_a_saved_workflow_calibrates_as_before(monkeypatch, pack):
    """``use_sparse`` (switch 4) comes after every other input, optional and off; a workflow
    saved before it (no value for it) asks for the same candidates as before."""
    import sys

    from ditfastattn_core.strategies import DEFAULT_CANDIDATES, Strategy

    node = pack["DiTFastAttn_Calibrate"]
    last = node.GET_SCHEMA().inputs[-1]
    assert last.id == "use_sparse" and last.optional and last.default is False
    module = sys.modules[node.__module__]
    seen = []

    def fake_calibrate(model, positive, negative, latent, request, on_progress=None):
        seen.append(request.candidates)
        raise _Captured

    monkeypatch.setattr(module, "calibrate", fake_calibrate)
    args = (None, [], [], {"samples": torch.zeros(1, 4, 8, 8)}, 0, 4, 3.0, "euler", "normal", 1.0, 0.1, "guided")
    kw = dict(window="band 1/8 (paper)", samples=1, window_kernel="auto", use_ast=True, use_wa_rs_asc=True,
              use_wa_rs=True, use_asc=True)
    for extra in ({}, {"use_sparse": True}):
        with pytest.raises(_Captured):
            node.execute(*args, **kw, **extra)
    names = [[s.name for s in candidates] for candidates in seen]  # the pack's own copy of the table
    assert names[0] == [s.name for s in DEFAULT_CANDIDATES] and "SPARSE" not in names[0]
    assert set(names[1]) == {*names[0], Strategy.SPARSE.name}


@pytest.mark.parametrize("name, dims", [("flux", 2), ("pixart", 2), ("sd3", 2), ("wan", 3), ("hunyuan_video", 3)])
def test_the_family_default_window_is_the_study_s_for_the_grid_and_the_plan_stores_it(pack, name, dims):
    """Calibrate's default window stands for the window study's preset for the model's kind of
    token grid (2D for image families, 3D for video ones); the plan stores that window and the
    summary names it, so the plan means the same on any later version of the table."""
    from dataclasses import astuple

    from ditfastattn_core.window import FAMILY_DEFAULT, FAMILY_WINDOWS, PRESETS

    node = pack["DiTFastAttn_Calibrate"]
    window_input = next(i for i in node.GET_SCHEMA().inputs if i.id == "window")
    assert window_input.default == FAMILY_DEFAULT and window_input.options[0] == FAMILY_DEFAULT
    assert PRESETS[FAMILY_WINDOWS[dims]].dims == dims
    tiny = BUILDERS[name]()
    plan, _, summary = node.execute(
        tiny.patcher, tiny.positive, tiny.negative, {"samples": tiny.latent}, 0, 3, 3.0, "euler", "normal", 1.0,
        0.1, "guided", window=FAMILY_DEFAULT, samples=1, window_kernel="auto", use_ast=True, use_wa_rs_asc=True,
        use_wa_rs=True, use_asc=True).result
    assert astuple(plan.window) == astuple(PRESETS[FAMILY_WINDOWS[dims]])  # the pack's own copy of the class
    assert f"window: {FAMILY_WINDOWS[dims]}, the default for " in summary
    explicit, _, summary = node.execute(
        tiny.patcher, tiny.positive, tiny.negative, {"samples": tiny.latent}, 0, 3, 3.0, "euler", "normal", 1.0,
        0.1, "guided", window="band 1/8 (paper)", samples=1, window_kernel="auto", use_ast=True,
        use_wa_rs_asc=True, use_wa_rs=True, use_asc=True).result
    assert astuple(explicit.window) == astuple(PRESETS["band 1/8 (paper)"]) and "the default for" not in summary
