"""FastAttn under ComfyUI's own TorchCompileModel node (inductor on the CPU).

A compiled run must compute what the eager run of the same plan computes, with the plan's
compressed cells really compressed (the run's statistics match the eager run's, no cache
misses), in either order of the two nodes, and a second run must reuse the compiled graphs.
"""

from __future__ import annotations

import logging

import pytest
import torch

from ditfastattn_core.comfy_bridge import apply_fastattn

from .test_apply import plan_for, run_stats, sample
from .tiny import BUILDERS

COMPRESSED = ("window", "reuse", "cfg_copy")


@pytest.fixture(scope="module")
def inductor():
    """Skip where inductor cannot build a CPU kernel here (no C++ compiler, for one)."""
    try:
        torch.compile(lambda x: x.sin() + 1, backend="inductor", fullgraph=True)(torch.ones(4))
    except Exception as e:  # any failure means the backend is unusable here
        pytest.skip(f"torch.compile's inductor backend cannot compile on this machine: {type(e).__name__}: {e}")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module", params=["sd3", "pixart"])
def tiny(request, inductor):
    """SD3 reaches the pack through the attention override, PixArt through module patches."""
    return BUILDERS[request.param]()


def compiled(model):
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    return TorchCompileModel.execute(model, "inductor").args[0]


def compressing_plan(tiny):
    from ditfastattn_core.comfy_bridge import detect_family, layer_count

    layers = layer_count(tiny.patcher.model, detect_family(tiny.patcher.model))
    return plan_for(tiny, ["F" * layers, "W" * layers, "T" * layers, "X" * layers])


def close_to(reference: torch.Tensor) -> dict:
    """Inductor reorders float sums: tolerances relative to the output's scale (random tiny models
    give outputs in the thousands)."""
    return {"rtol": 1e-4, "atol": 1e-5 * float(reference.abs().max())}


@pytest.mark.parametrize("order", ["apply_then_compile", "compile_then_apply"])
def test_compiled_run_equals_eager_run_and_compresses(tiny, order, caplog):
    from torch._dynamo.utils import counters

    caplog.set_level(logging.INFO, logger="ditfastattn")
    plan = compressing_plan(tiny)
    eager = sample(tiny, apply_fastattn(tiny.patcher, plan))
    eager_stats = run_stats(caplog)
    assert all(eager_stats.get(k, 0) > 0 for k in COMPRESSED), eager_stats

    if order == "apply_then_compile":
        model = compiled(apply_fastattn(tiny.patcher, plan))
    else:
        model = apply_fastattn(compiled(tiny.patcher), plan)
    caplog.clear()
    out = sample(tiny, model)
    assert run_stats(caplog) == eager_stats  # every compressed cell ran compressed, no misses
    torch.testing.assert_close(out, eager, **close_to(eager))

    frames = counters["frames"]["total"]
    caplog.clear()
    again = sample(tiny, model)
    assert counters["frames"]["total"] == frames, "the second compiled run compiled again"
    assert run_stats(caplog) == eager_stats
    torch.testing.assert_close(again, out, rtol=0, atol=0)


def boundary_breaks() -> int:
    """Graph breaks dynamo has counted at the pack's attention hooks."""
    from torch._dynamo.utils import counters

    from ditfastattn_core.comfy_bridge.attention_hooks import COMPILE_BOUNDARY

    return sum(n for reason, n in counters["graph_break"].items() if COMPILE_BOUNDARY in reason)


def test_one_compiled_model_without_the_pack_with_an_all_full_plan_and_with_a_compressing_plan(tiny, caplog):
    """One TorchCompileModel output sampled plain, then behind Apply FastAttn with an all-FULL
    plan (which hooks nothing: the plain graph), with a compressing plan (compressed, as in
    eager), and plain again.

    ComfyUI 0.29.0's TorchCompileModel does not guard on transformer_options, so where the
    plain run's graphs inline attention they would run the compressing plan FULL: the pack
    refuses that run once (and drops the stale graphs), and the run after it compiles with the
    hooks. (These tiny models' plain graphs do not inline attention; bench/compile.py's model
    does: ``test_a_compiled_call_that_never_reached_the_hooks_is_refused``.)"""
    from ditfastattn_core.comfy_bridge import detect_family
    from ditfastattn_core.comfy_bridge.families import OVERRIDE
    from ditfastattn_core.comfy_bridge.wrappers import StaleCompiledGraphError

    caplog.set_level(logging.INFO, logger="ditfastattn")
    plan = compressing_plan(tiny)
    full = plan_for(tiny, ["F" * plan.layers] * plan.steps)
    sample(tiny, apply_fastattn(tiny.patcher, plan))
    eager_stats = run_stats(caplog)

    torch._dynamo.reset()
    model = compiled(tiny.patcher)
    plain = sample(tiny, model)
    breaks = boundary_breaks()
    all_full = sample(tiny, apply_fastattn(model, full))
    torch.testing.assert_close(all_full, plain, **close_to(plain))
    if detect_family(tiny.patcher.model).attach == OVERRIDE:
        assert boundary_breaks() == breaks, "an all-FULL plan hooked attention"

    try:
        sample(tiny, apply_fastattn(model, plan))
    except StaleCompiledGraphError:
        pass  # the plain graph ran (ComfyUI 0.29.0, where it inlines attention); the pack dropped it
    caplog.clear()
    sample(tiny, apply_fastattn(model, plan))
    assert run_stats(caplog) == eager_stats  # the compiled graph called the hooks
    torch.testing.assert_close(sample(tiny, model), plain, **close_to(plain))


def test_a_compiled_call_that_never_reached_the_hooks_is_refused(monkeypatch):
    """The refusal itself: a model call of a TorchCompileModel'd model in which no attention call
    reached the pack raises (and drops torch.compile's cache); one that did, one without an image
    grid, and one of an uncompiled model pass."""
    from types import SimpleNamespace

    import comfy.patcher_extension

    from ditfastattn_core.comfy_bridge.keys import COMPILE_WRAPPER_KEY
    from ditfastattn_core.comfy_bridge.wrappers import StaleCompiledGraphError, check_reached

    resets = []
    monkeypatch.setattr(torch.compiler, "reset", lambda: resets.append(1))
    compiled_options = {"wrappers": {comfy.patcher_extension.WrappersMP.APPLY_MODEL: {COMPILE_WRAPPER_KEY: [print]}}}
    with pytest.raises(StaleCompiledGraphError, match="queue the prompt again"):
        check_reached(SimpleNamespace(layers_seen=0, grid=(4, 4)), compiled_options)
    assert resets == [1]
    check_reached(SimpleNamespace(layers_seen=2, grid=(4, 4)), compiled_options)
    check_reached(SimpleNamespace(layers_seen=0, grid=None), compiled_options)
    check_reached(SimpleNamespace(layers_seen=0, grid=(4, 4)), {"wrappers": {}})
    assert resets == [1]
