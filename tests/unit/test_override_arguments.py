"""The attention override hands calls it cannot honour to the backend untouched.

Runs without ComfyUI: the override only needs a call object in its slot."""

from __future__ import annotations

import pytest
import torch

from ditfastattn_core.comfy_bridge import attention_hooks
from ditfastattn_core.comfy_bridge.attention_hooks import CallSlot, make_override, unsupported_argument


class RecordingCall:
    """Stands for the model call; records what the override routes to it."""

    def __init__(self):
        self.unsupported = "not called"


def recording_route(call, q, k, v, *, unsupported, passthrough, **_):
    call.unsupported = unsupported
    return passthrough()


def backend(q, k, v, heads, **kwargs):
    return ("backend", q.shape, k.shape, heads, tuple(sorted(kwargs)))


@pytest.mark.parametrize("extra,reason", [
    ({}, None),
    ({"enable_gqa": False}, None),
    ({"scale": None}, None),
    ({"scale": 16 ** -0.5}, None),
    ({"attn_precision": torch.float32, "low_precision_attention": True}, None),
    ({"enable_gqa": True}, "enable_gqa=True"),
    ({"scale": 0.5}, "scale=0.5"),
    ({"mask": torch.zeros(1, 4, 4)}, "a padding mask"),
    ({"rotary_sink": 3}, "the argument 'rotary_sink'"),
])
def test_calls_the_engine_cannot_honour_pass_through_untouched(extra, reason, monkeypatch):
    monkeypatch.setattr(attention_hooks, "route_attention", recording_route)
    call = RecordingCall()
    slot = CallSlot()
    slot.current = call
    override = make_override(None, slot)
    q = torch.zeros(1, 4, 2 * 16)
    k = v = torch.zeros(1, 4, 16) if extra.get("enable_gqa") else torch.zeros(1, 4, 2 * 16)
    kwargs = {"transformer_options": {}, "_inside_attn_wrapper": True, **extra}
    out = override(backend, q, k, v, 2, **kwargs)
    assert call.unsupported == reason
    assert out == ("backend", q.shape, k.shape, 2, tuple(sorted(kwargs)))  # the original call, as made


def test_default_scale_is_recognised_per_head_dim():
    assert unsupported_argument({"scale": 64 ** -0.5}, 64) is None
    assert unsupported_argument({"scale": 64 ** -0.5}, 128) == f"scale={64 ** -0.5!r}"
