"""Models whose token layout cannot be established are refused before sampling, by name."""

from __future__ import annotations

import pytest
import torch

from ditfastattn_core import Plan, Schedule
from ditfastattn_core.comfy_bridge import UnsupportedModelError, apply_fastattn, families
from ditfastattn_core.comfy_bridge.calibration import CalibrationRequest, calibrate

from . import tiny as tiny_models


def _plain_build(cls_name, cfg):
    import comfy.supported_models

    if not hasattr(comfy.supported_models, cls_name):
        pytest.skip(f"this ComfyUI has no {cls_name}")
    return tiny_models._build(cls_name, cfg)


def _refused_on_apply_and_calibrate(patcher, match):
    plan = Plan(schedule=Schedule.uniform(2, 2), family="wan", sigmas=(2.0, 1.0, 0.0))
    with pytest.raises(UnsupportedModelError, match=match):
        apply_fastattn(patcher, plan)
    latent = {"samples": torch.zeros(1, 16, 3, 8, 6)}
    with pytest.raises(UnsupportedModelError, match=match):
        calibrate(patcher, [], [], latent, CalibrationRequest(seed=0, steps=2, cfg=2.0, sampler_name="euler",
                                                              scheduler="normal"))


def test_wan_causal_ar_is_refused_before_sampling():
    patcher = _plain_build("WAN21_CausalAR_T2V", tiny_models._wan_config())
    _refused_on_apply_and_calibrate(patcher, "WAN21_CausalAR is not supported: .*KV cache")


@pytest.mark.parametrize("cls_name,config", [
    ("WAN21_Vace", {"model_type": "vace", "vace_layers": 1, "vace_in_dim": 96}),
    ("WAN22_S2V", {"model_type": "s2v", "audio_dim": 32, "num_audio_token": 4, "cond_dim": 16,
                   "audio_inject_layers": [0, 1]}),
])
def test_wan_variants_are_refused_on_trees_that_do_not_place_their_tokens(cls_name, config):
    if families.comfyui_version() >= (0, 29, 0):
        pytest.skip("this ComfyUI marks the blocks these variants need")
    patcher = _plain_build(cls_name, tiny_models._wan_config(**config))
    _refused_on_apply_and_calibrate(patcher, "needs ComfyUI 0.29.0 or later")
