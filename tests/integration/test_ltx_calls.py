"""LTX models mark no blocks: a layer's video self-attention is the call whose q and k both have
the video's length. Model calls where another sequence has that length (LTX-2's audio), or whose
video tokens are not the latent's grid (keyframe guides), must run FULL, explained once, never
windowed by guess. And calibration samples an audio-video (nested) latent as KSampler does."""

from __future__ import annotations

import logging

import pytest
import torch

from ditfastattn_core.comfy_bridge import apply_fastattn
from ditfastattn_core.comfy_bridge.calibration import CalibrationRequest, calibrate

from . import tiny as tiny_models
from .test_apply import STEPS, plan_for, uniform


def _fully_dense_and_explained_once(tiny, explanation, caplog, noise_mask=None):
    import comfy.sample

    def run(model):
        return tiny_models.flat(comfy.sample.sample(
            model, tiny_models.noise_like(tiny.latent, 0), STEPS, 3.0, "euler", "normal", tiny.positive,
            tiny.negative, tiny.latent, noise_mask=noise_mask, seed=0, disable_pbar=True))

    caplog.set_level(logging.WARNING, logger="ditfastattn")
    plain = run(tiny.patcher)
    patched = apply_fastattn(tiny.patcher, plan_for(tiny, uniform(tiny, "W")))
    assert torch.equal(run(patched), plain), "a call that cannot be placed was windowed"
    messages = [r.getMessage() for r in caplog.records]
    assert sum(explanation in m for m in messages) == 1, messages


def test_ltx2_audio_as_long_as_the_video_runs_full(caplog):
    tiny = tiny_models.ltx2_av(audio_frames=3 * 4 * 6)  # 72 audio tokens, 72 video tokens
    _fully_dense_and_explained_once(tiny, "the audio has as many tokens as the video (72)", caplog)


@pytest.mark.parametrize("builder", [tiny_models.ltxv, tiny_models.ltx2], ids=["ltxv", "ltx2"])
def test_keyframe_guides_run_full(builder, caplog):
    """LTXVAddGuide appends the guide's latent frames, whose tokens sit at the keyframe's positions."""
    tiny = builder()
    nodes_lt = pytest.importorskip("comfy_extras.nodes_lt")
    guide = torch.randn(1, 128, 1, 4, 6, generator=torch.Generator().manual_seed(3))
    positive, negative, latent, noise_mask = nodes_lt.LTXVAddGuide.append_keyframe(
        tiny.positive, tiny.negative, 0, tiny.latent, torch.ones(1, 1, 3, 4, 6), guide, 1.0, (8, 32, 32))
    assert latent.shape[2] == 4, "the guide frame is appended to the latent"
    guided = tiny_models.Tiny(tiny.family, tiny.patcher, latent, positive, negative, tiny.negative_other_length)
    _fully_dense_and_explained_once(guided, "keyframe guides", caplog, noise_mask=noise_mask)


def test_calibration_samples_an_audio_video_latent():
    tiny = tiny_models.ltx2_av()
    request = CalibrationRequest(seed=0, steps=3, cfg=3.0, sampler_name="euler", scheduler="normal")
    result = calibrate(tiny.patcher, tiny.positive, tiny.negative, {"samples": tiny.latent}, request)
    assert result.plan.family == "ltx2" and result.plan.grid == (3, 4, 6) and result.plan.layers == 2
    video, audio = result.samples.unbind()
    assert video.shape == (1, 128, 3, 4, 6) and audio.shape == (1, 8, 10, 16)
    assert result.stats.get("window", 0) + result.stats.get("reuse", 0) + result.stats.get("cfg_copy", 0) > 0, \
        result.stats
    with pytest.raises(ValueError, match="samples > 1 with an audio-video latent"):
        calibrate(tiny.patcher, tiny.positive, tiny.negative, {"samples": tiny.latent},
                  CalibrationRequest(seed=0, steps=3, cfg=3.0, sampler_name="euler", scheduler="normal", samples=2))
