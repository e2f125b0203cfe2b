"""The attention override hands calls it cannot honour to the backend untouched.

Runs without ComfyUI: the override only needs a call object in transformer_options."""

from __future__ import annotations

import pytest
import torch

from ditfastattn_core.comfy_bridge.attention_hooks import make_override, unsupported_argument
from ditfastattn_core.comfy_bridge.run import CALL_KEY


class RecordingCall:
    def __init__(self):
        self.unsupported = "not called"

    def attention(self, q, k, v, *, unsupported, passthrough, **_):
        self.unsupported = unsupported
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
def test_calls_the_engine_cannot_honour_pass_through_untouched(extra, reason):
    call = RecordingCall()
    override = make_override(None)
    q = torch.zeros(1, 4, 2 * 16)
    k = v = torch.zeros(1, 4, 16) if extra.get("enable_gqa") else torch.zeros(1, 4, 2 * 16)
    kwargs = {"transformer_options": {CALL_KEY: call}, "_inside_attn_wrapper": True, **extra}
    out = override(backend, q, k, v, 2, **kwargs)
    assert call.unsupported == reason
    assert out == ("backend", q.shape, k.shape, 2, tuple(sorted(kwargs)))  # the original call, as made


def test_default_scale_is_recognised_per_head_dim():
    assert unsupported_argument({"scale": 64 ** -0.5}, 64) is None
    assert unsupported_argument({"scale": 64 ** -0.5}, 128) == f"scale={64 ** -0.5!r}"
