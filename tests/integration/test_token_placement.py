"""Which token positions the pack windows, proven per family on the running ComfyUI tree.

Attention is made token-local (an inner override returns v for every self-attention call, so
no token mixes with another; the pack's FULL output is that dense result), then one latent
location is perturbed. The only q token that changes in each compressible layer is the image
token the model really made from that location, in the order it really uses. It must sit at
the position the pack computed: ``image_start + raster index`` of the token layout it
windows. Text, reference, padding and register tokens never change, and lie outside the
image span, so they stay global.
"""

from __future__ import annotations

import math

import pytest
import torch

import ditfastattn_core.comfy_bridge.run as bridge_run
from ditfastattn_core import Plan, Schedule
from ditfastattn_core.comfy_bridge import apply_fastattn, model_geometry
from ditfastattn_core.comfy_bridge.families import OVERRIDE

from .tiny import BUILDERS, is_nested, noise_like


def identity_attention(func, *args, **kwargs):
    """Self-attention returns v (token-local); any other call (cross-attention) runs as usual."""
    q, k, v = args[:3]
    heads = args[3] if len(args) > 3 else kwargs.get("heads")
    skip_reshape = kwargs.get("skip_reshape", False)
    seq = 2 if skip_reshape else 1
    if q.shape[seq] != k.shape[seq]:
        return func(*args, **kwargs)
    out = v
    if skip_reshape:
        if out.shape[1] != q.shape[1]:  # grouped-query attention: repeat the kv heads
            out = out.repeat_interleave(q.shape[1] // out.shape[1], dim=1)
        if not kwargs.get("skip_output_reshape", False):
            out = out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)
    else:
        if out.dim() == 4:  # (B, L, H, D)
            out = out.reshape(out.shape[0], out.shape[1], -1)
        if kwargs.get("skip_output_reshape", False):
            out = out.reshape(out.shape[0], out.shape[1], heads, -1).transpose(1, 2)
    return out


def _per_token(q: torch.Tensor, skip_reshape: bool) -> torch.Tensor:
    """q as (B, L, features)."""
    if skip_reshape:
        return q.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)
    return q.reshape(q.shape[0], q.shape[1], -1)


def record_first_call(tiny, noise, monkeypatch):
    """Sample one step through the pack; per layer of the first model call: (layout, q per token)."""
    import comfy.sample

    geometry = model_geometry(tiny.patcher)
    m = tiny.patcher.clone()
    m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = identity_attention
    rows = ["F" * geometry.layers, "W" * geometry.layers]  # step 0 FULL keeps every layer's residual
    plan = Plan(schedule=Schedule.from_letters(rows), family=geometry.family, sigmas=(2.0, 1.0, 0.0))
    patched = apply_fastattn(m, plan)
    seen: dict[int, tuple] = {}
    real_attend = bridge_run.attend

    def recording_attend(q, k, v, strategy, layer, ctx, state, **kw):
        if ctx.step == 0 and ctx.cond_or_uncond == (0,):
            seen.setdefault(layer, (ctx.tokens, _per_token(q, kw["skip_reshape"]).clone()))
        return real_attend(q, k, v, strategy, layer, ctx, state, **kw)

    monkeypatch.setattr(bridge_run, "attend", recording_attend)
    comfy.sample.sample(patched, noise, 2, 1.0, "euler", "normal", tiny.positive, tiny.negative, tiny.latent,
                        seed=0, disable_pbar=True)
    monkeypatch.setattr(bridge_run, "attend", real_attend)
    return geometry, seen


def probe_locations(latent: torch.Tensor, patch: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The first, a middle and the last latent location (trailing spatial axes)."""
    spatial = tuple(latent.shape[2:])
    last = tuple(s - 1 for s in spatial)
    middle = tuple(s // 2 for s in spatial)
    return [tuple(0 for _ in spatial), middle, last]


def expected_token(location: tuple[int, ...], latent: torch.Tensor, geometry) -> int:
    """The raster index (slowest axis first) of the token made from a latent location."""
    grid = geometry.grid(tuple(latent.shape))
    if len(location) == 3 and len(geometry.patch) == 2:  # one latent frame of an image model
        location = location[1:]
    if len(location) == 2 and len(geometry.patch) == 3:  # an image through a video model
        location = (0, *location)
    index = 0
    for c, p, g in zip(location, geometry.patch, grid, strict=True):
        index = index * g + c // p
    return index


def perturbed_at(noise, location: tuple[int, ...]):
    """The noise with one image latent location (all channels) raised."""
    if is_nested(noise):
        import comfy.nested_tensor

        parts = [t.clone() for t in noise.unbind()]
        parts[0] = perturbed_at(parts[0], location)
        return comfy.nested_tensor.NestedTensor(parts)
    noise = noise.clone()
    noise[(slice(None), slice(None), *location)] += 3.0
    return noise


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_windowed_positions_are_the_image_tokens_the_model_makes(name, monkeypatch):
    tiny = BUILDERS[name]()
    base_noise = noise_like(tiny.latent, 0)
    # a nested latent (LTX-2's video and audio): the image is its first part, the audio stays as it is
    image = tiny.latent.unbind()[0] if is_nested(tiny.latent) else tiny.latent
    geometry, base = record_first_call(tiny, base_noise, monkeypatch)
    assert sorted(base) == list(range(geometry.layers)), f"layers routed at step 0: {sorted(base)}"
    n = math.prod(geometry.grid(tuple(image.shape)))
    for layout, _ in base.values():
        assert layout.num_image == n
    # token-local everywhere only where our inner override reaches every attention call
    layers = range(geometry.layers) if geometry.attach == OVERRIDE else [0]
    for location in probe_locations(image, geometry.patch):
        noise = perturbed_at(base_noise, location)
        _, perturbed = record_first_call(tiny, noise, monkeypatch)
        token = expected_token(location, image, geometry)
        for layer in layers:
            layout, q0 = base[layer]
            changed = ((perturbed[layer][1] - q0).abs().amax(dim=(0, 2)) > 1e-6).nonzero().flatten().tolist()
            assert changed == [layout.image_start + token], (
                f"{name} layer {layer}: latent {location} changed q tokens {changed}, the pack windows "
                f"image token {token} at {layout.image_start + token} (image {layout.image_start}..{layout.image_stop} "
                f"of {layout.seq_len})"
            )
