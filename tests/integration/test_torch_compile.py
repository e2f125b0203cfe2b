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
    drops the stale graphs and runs that model call again, compiled with the hooks. (These tiny
    models' plain graphs do not inline attention; bench/compile.py's model does: see
    ``test_a_compiled_call_that_never_reached_the_hooks_runs_again_compiled_with_them``.)"""
    from ditfastattn_core.comfy_bridge import detect_family
    from ditfastattn_core.comfy_bridge.families import OVERRIDE

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

    caplog.clear()
    sample(tiny, apply_fastattn(model, plan))
    assert run_stats(caplog) == eager_stats  # the compiled graph called the hooks (recompiled if stale)
    torch.testing.assert_close(sample(tiny, model), plain, **close_to(plain))


def test_a_compiled_call_that_never_reached_the_hooks_runs_again_compiled_with_them(monkeypatch, caplog):
    """The recovery itself, with a stand-in for a stale compiled graph: a model call of a
    TorchCompileModel'd model in which no attention call reached the pack drops torch.compile's
    cache and runs again (reaching the hooks then); one that never reaches them raises; one that
    did, one without an image grid, and one of an uncompiled model are left alone."""
    from types import SimpleNamespace

    import comfy.patcher_extension

    from ditfastattn_core.comfy_bridge.keys import COMPILE_WRAPPER_KEY, RUN_KEY
    from ditfastattn_core.comfy_bridge.run import ModelCall
    from ditfastattn_core.comfy_bridge.wrappers import (
        StaleCompiledGraphError,
        make_apply_model_wrapper,
        ran_stale_graph,
    )

    caplog.set_level(logging.WARNING, logger="ditfastattn")
    resets = []
    monkeypatch.setattr(torch.compiler, "reset", lambda: resets.append(1))
    compiled_options = {"wrappers": {comfy.patcher_extension.WrappersMP.APPLY_MODEL: {COMPILE_WRAPPER_KEY: [print]}}}
    assert ran_stale_graph(SimpleNamespace(layers_seen=0, grid=(4, 4)), compiled_options)
    assert not ran_stale_graph(SimpleNamespace(layers_seen=2, grid=(4, 4)), compiled_options)
    assert not ran_stale_graph(SimpleNamespace(layers_seen=0, grid=None), compiled_options)
    assert not ran_stale_graph(SimpleNamespace(layers_seen=0, grid=(4, 4)), {"wrappers": {}})

    reports = []
    run = SimpleNamespace(hooks_attention=True, report=lambda key, message: reports.append(key))
    calls = []

    def begin_call(*args):
        calls.append(ModelCall(run=run, state=None, step=0, cond_or_uncond=(0,), grid=(4, 4), text_len=None))
        return calls[-1]

    run.begin_call = begin_call
    options = {**compiled_options, RUN_KEY: run}
    wrapper = make_apply_model_wrapper(slot=SimpleNamespace(current=None))
    passes = []

    def stale_once(*args, **kwargs):  # the first pass skips the hooks, the recompiled one reaches them
        passes.append(1)
        if len(passes) > 1:
            calls[-1].layers_seen += 2
        return torch.full((1,), float(len(passes)))

    out = wrapper(stale_once, torch.zeros(1), torch.ones(1), transformer_options=options)
    assert out.item() == 2.0 and len(passes) == 2 and resets == [1] and reports == ["stale_graph"]

    with pytest.raises(StaleCompiledGraphError, match="even after recompiling"):
        wrapper(lambda *a, **k: torch.zeros(1), torch.zeros(1), torch.ones(1), transformer_options=options)
