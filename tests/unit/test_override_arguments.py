"""The attention override hands calls it cannot honour to the backend untouched.

Runs without ComfyUI: the override only needs a call object in its slot."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ditfastattn_core.comfy_bridge import attention_hooks
from ditfastattn_core.comfy_bridge.attention_hooks import CallSlot, make_override, unsupported_argument


class RecordingCall:
    """Stands for the model call; records what the override routes to it."""

    def __init__(self, preferred=None):
        self.unsupported = "not called"
        self.run = SimpleNamespace(preferred_attention=preferred)


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


# --- ComfyUI 0.35+: tensor containers and the module's own backend ------------------------------
# The contract, as read in Comfy-Org/ComfyUI@05080f60 comfy/ldm/modules/attention.py (wrap_attn,
# AttentionTensorContainer): with containers, an override is called through its
# ``container_function`` (no ``func``, no ``preferred_attention``); without an override the
# module's ``preferred_attention.function`` gets the containers.


class Container:
    """A single-owner tensor holder with the contract of ComfyUI's AttentionTensorContainer."""

    def __init__(self, tensor):
        self.tensor = tensor

    def peek(self):
        if self.tensor is None:
            raise RuntimeError("consumed")
        return self.tensor

    def take(self):
        tensor = self.peek()
        self.tensor = None
        return tensor


class ModuleBackend:
    """A module's own backend (``preferred_attention``) that takes containers, as comfy-kitchen's
    INT8 attention does (it prequantizes, then frees q, k and v)."""

    def __init__(self):
        self.calls = []
        self.function = self

    def __call__(self, q, k, v, heads, **kwargs):
        assert all(isinstance(t, Container) for t in (q, k, v)), "the module's backend gets the containers"
        self.calls.append(kwargs)
        return ("module", q.take().shape, k.take().shape, v.take().shape, heads)


def test_container_calls_it_leaves_alone_run_the_modules_own_backend_unconsumed(monkeypatch):
    monkeypatch.setattr(attention_hooks, "route_attention", recording_route)
    module = ModuleBackend()
    slot = CallSlot()
    slot.current = RecordingCall(preferred=module)
    override = make_override(None, slot)
    q = torch.zeros(1, 2, 4, 16)
    out = override.container_function(Container(q), Container(q), Container(q), 2, skip_reshape=True,
                                      transformer_options={}, _inside_attn_wrapper=True)
    assert out == ("module", q.shape, q.shape, q.shape, 2) and len(module.calls) == 1


def test_container_calls_go_to_a_previous_overrides_container_function(monkeypatch):
    monkeypatch.setattr(attention_hooks, "route_attention", recording_route)
    seen = []

    def previous(func, *args, **kwargs):
        raise AssertionError("a previous override with a container function gets the containers")

    def previous_containers(q, k, v, heads, **kwargs):
        seen.append(all(isinstance(t, Container) for t in (q, k, v)))
        return "previous"

    previous.container_function = previous_containers
    slot = CallSlot()
    slot.current = RecordingCall(preferred=ModuleBackend())
    override = make_override(previous, slot)
    q = torch.zeros(1, 2, 4, 16)
    assert override.container_function(Container(q), Container(q), Container(q), 2, skip_reshape=True,
                                       transformer_options={}) == "previous"
    assert seen == [True]


def test_a_previous_override_without_container_function_gets_tensors_and_the_core_backend(monkeypatch):
    import sys
    import types

    monkeypatch.setattr(attention_hooks, "route_attention", recording_route)
    core = types.ModuleType("comfy.ldm.modules.attention")
    core.optimized_attention = lambda *a, **k: "core"
    monkeypatch.setitem(sys.modules, "comfy.ldm.modules.attention", core)
    got = []

    def previous(func, q, k, v, heads, **kwargs):
        got.append((func, type(q)))
        return func(q, k, v, heads, **kwargs)

    slot = CallSlot()
    slot.current = RecordingCall()
    override = make_override(previous, slot)
    q = torch.zeros(1, 2, 4, 16)
    assert override.container_function(Container(q), Container(q), Container(q), 2, skip_reshape=True) == "core"
    assert got == [(core.optimized_attention, torch.Tensor)]


def test_outside_a_fastattn_model_call_containers_pass_on_untouched():
    module = ModuleBackend()
    override = make_override(None, CallSlot())
    q = torch.zeros(1, 2, 4, 16)
    override.container_function(Container(q), Container(q), Container(q), 2, preferred_attention=module)
    assert len(module.calls) == 1, "a core that hands the override the module's backend: it is used"


def test_patched_modules_call_the_core_as_the_module_does(monkeypatch):
    """PixArt's patched attention module (the pack owns its forward) calls the core's attention as
    ComfyUI 0.35+'s module does: containers and its own backend; on older trees, plain tensors."""
    import sys
    import types

    calls = []
    core = types.ModuleType("comfy.ldm.modules.attention")
    core.optimized_attention = lambda q, k, v, heads, **kw: calls.append((type(q), kw)) or "core"
    for parent in ("comfy", "comfy.ldm", "comfy.ldm.modules"):
        monkeypatch.setitem(sys.modules, parent, types.ModuleType(parent))
    monkeypatch.setitem(sys.modules, "comfy.ldm.modules.attention", core)
    sys.modules["comfy.ldm.modules"].attention = core
    module = torch.nn.Linear(1, 1)
    module.comfy_attention = SimpleNamespace(function=None)
    q = torch.zeros(1, 2, 4, 16)
    assert attention_hooks.module_attention(module)(q, q, q, 2, skip_reshape=True) == "core"
    assert calls[-1] == (torch.Tensor, {"skip_reshape": True}), "no containers on a core without them"
    core.AttentionTensorContainer = Container
    assert attention_hooks.module_attention(module)(q, q, q, 2, skip_reshape=True) == "core"
    assert calls[-1] == (Container, {"preferred_attention": module.comfy_attention, "skip_reshape": True})
