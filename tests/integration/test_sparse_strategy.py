"""Plan letter S (Sol-Attn) in real ComfyUI on tiny models whose text sits before, after and on
both sides of the image tokens: it runs sparse where the sequence has enough 64-token blocks, and
wherever it cannot run (no comfy-kitchen with sol_attn) the layer is dense, counted, and the
sample is the unpatched model's."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from ditfastattn_core import sparse
from ditfastattn_core.comfy_bridge import apply_fastattn

from .test_apply import plan_for, run_stats, sample, uniform
from .tiny import flux, flux_kontext, hunyuan_video, pixart


def _larger(tiny, latent):
    """The tiny model at a latent large enough for several Sol-Attn blocks (300-400 tokens)."""
    return dataclasses.replace(tiny, latent=torch.zeros(latent))


CASES = {
    "flux": (flux, (1, 16, 32, 48)),                    # 8 text tokens, then 384 image tokens
    "hunyuan_video": (hunyuan_video, (1, 16, 3, 16, 24)),  # 288 image tokens, then the text
    "flux_kontext": (flux_kontext, (1, 16, 32, 48)),    # text, image, then the reference image's tokens
    "pixart": (pixart, (1, 4, 32, 40)),                 # 320 image tokens, text by cross-attention
}


@pytest.fixture(scope="module", params=sorted(CASES))
def tiny(request):
    build, latent = CASES[request.param]
    return _larger(build(), latent)


@pytest.mark.skipif(not sparse.available(), reason="comfy-kitchen without sol_attn here (< 0.2.40)")
def test_sol_attn_runs_sparse_wherever_the_text_sits(tiny, caplog):
    caplog.set_level(logging.INFO, logger="ditfastattn")
    plain = sample(tiny)
    out = sample(tiny, apply_fastattn(tiny.patcher, plan_for(tiny, uniform(tiny, "S"))))
    stats = run_stats(caplog)
    assert torch.isfinite(out).all()
    assert stats.get("sparse", 0) > 0, stats
    assert not any(k.startswith("sparse_") for k in stats), stats
    assert ((out - plain).norm() / plain.norm()) < 0.5, "an approximation of the same model, not another one"


def test_without_comfy_kitchen_a_plan_with_sol_attn_samples_the_unpatched_model(tiny, caplog, monkeypatch):
    monkeypatch.setattr(sparse, "_reference", lambda: None)
    caplog.set_level(logging.INFO, logger="ditfastattn")
    plain = sample(tiny)
    out = sample(tiny, apply_fastattn(tiny.patcher, plan_for(tiny, uniform(tiny, "S"))))
    stats = run_stats(caplog)
    assert stats.get("sparse_unavailable", 0) > 0 and not stats.get("sparse", 0), stats
    assert torch.equal(out, plain)
