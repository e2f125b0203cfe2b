"""Apply FastAttn under ComfyUI 0.35+'s attention contracts (``comfy035``: tensor containers and
the module's own backend, the Model Attention Backend node, core Model Sparse Attention), on a
real tree's Flux, and beside the real trees' own override chain."""

from __future__ import annotations

import logging

import pytest
import torch

from ditfastattn_core.comfy_bridge import apply_fastattn
from ditfastattn_core.comfy_bridge.attention_chain import MixedModuleBackends
from ditfastattn_core.comfy_bridge.keys import OVERRIDE_KEY
from ditfastattn_core.comfy_bridge.run import Run
from ditfastattn_core.state import RunState

from .comfy035 import (
    Backend,
    ComfyAttention,
    SparsePatch,
    flux_with_containers,
    model_sparse_attention,
    set_model_optimized_attention,
)
from .test_apply import STEPS, plan_for, run_stats, sample, uniform
from .tiny import flux


@pytest.fixture(scope="module")
def tiny():
    return flux()


@pytest.fixture
def hooked_full(monkeypatch):
    """An all-FULL plan whose run still installs the override (normally an all-FULL plan leaves
    attention alone), so every call goes through the pack's pass-through and dense paths."""
    monkeypatch.setattr(Run, "hooks_attention", property(lambda self: True))


def full(tiny):
    return plan_for(tiny, uniform(tiny, "F"))


def test_calls_left_alone_run_the_modules_own_backend_with_its_containers(tiny, monkeypatch, hooked_full):
    module = Backend(grid=8.0)
    flux_with_containers(monkeypatch, tiny.patcher, module)
    plain = sample(tiny)
    plain_calls = dict(module.calls)
    assert plain_calls["containers"] > 0 and plain_calls["tensors"] == 0, "without FastAttn: its container path"
    with_pack = sample(tiny, apply_fastattn(tiny.patcher, full(tiny)))
    assert torch.equal(with_pack, plain)
    assert module.calls == {"containers": 2 * plain_calls["containers"], "tensors": 0}, \
        "every call again went to the module's backend, as containers (its memory saving kept)"


def test_dense_computations_of_a_compressing_plan_use_the_modules_backend(tiny, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="ditfastattn")
    module = Backend(grid=8.0)
    flux_with_containers(monkeypatch, tiny.patcher, module)
    sample(tiny, apply_fastattn(tiny.patcher, plan_for(tiny, uniform(tiny, "W"))))
    assert run_stats(caplog).get("window", 0) > 0
    assert module.calls["containers"] > 0, "FULL steps and residual refreshes ran the module's own backend"


@pytest.mark.parametrize("order", ["backend, then FastAttn", "FastAttn, then backend"])
def test_a_backend_patch_in_either_order_all_full_is_bit_exact(tiny, monkeypatch, hooked_full, order):
    flux_with_containers(monkeypatch, tiny.patcher, Backend(grid=8.0))
    backend = Backend(grid=4.0)
    alone = tiny.patcher.clone()
    set_model_optimized_attention(alone, backend.function)
    expected = sample(tiny, alone)
    assert not torch.equal(expected, sample(tiny)), "the backend patch changes the output"
    calls = dict(backend.calls)
    if order == "backend, then FastAttn":
        model = apply_fastattn(alone, full(tiny))
    else:
        model = apply_fastattn(tiny.patcher, full(tiny)).clone()
        set_model_optimized_attention(model, backend.function)
    assert torch.equal(sample(tiny, model), expected)
    assert backend.calls["containers"] == 2 * calls["containers"] > 0 and backend.calls["tensors"] == 0


@pytest.mark.parametrize("order", ["backend, then FastAttn", "FastAttn, then backend"])
def test_a_backend_patch_in_either_order_keeps_fastattn_compressing(tiny, monkeypatch, caplog, order):
    caplog.set_level(logging.INFO, logger="ditfastattn")
    flux_with_containers(monkeypatch, tiny.patcher, None)
    backend = Backend(grid=4.0)
    if order == "backend, then FastAttn":
        model = tiny.patcher.clone()
        set_model_optimized_attention(model, backend.function)
        model = apply_fastattn(model, plan_for(tiny, uniform(tiny, "W")))
    else:
        model = apply_fastattn(tiny.patcher, plan_for(tiny, uniform(tiny, "W"))).clone()
        set_model_optimized_attention(model, backend.function)
    sample(tiny, model)
    assert run_stats(caplog).get("window", 0) > 0, "FastAttn is still in place"
    assert backend.calls["containers"] > 0, "and its dense computations ran the chosen backend"


def test_the_override_is_tagged_memory_efficient_like_its_dense_path(tiny, monkeypatch):
    tags = []
    import comfy.samplers

    real = comfy.samplers.calc_cond_batch

    def calc(model, conds, x_in, timestep, model_options):
        tags.append(getattr(model_options["transformer_options"].get(OVERRIDE_KEY), "memory_efficient", "untagged"))
        return real(model, conds, x_in, timestep, model_options)

    monkeypatch.setattr(comfy.samplers, "calc_cond_batch", calc)
    plan = plan_for(tiny, uniform(tiny, "W"))
    tagged = tiny.patcher.clone()
    set_model_optimized_attention(tagged, Backend(grid=4.0).function, memory_efficient=False)
    sample(tiny, apply_fastattn(tagged, plan))
    assert set(tags) == {False}, "the previous override's tag (set with it) is the override's"
    tags.clear()
    sample(tiny, apply_fastattn(tiny.patcher, plan))
    import comfy.model_management as mm

    core_rule = bool(mm.xformers_enabled() or mm.pytorch_attention_flash_attention())
    assert set(tags) == {core_rule}, "with no previous override: the core's own rule for its backend"
    tags.clear()
    untagged = tiny.patcher.clone()
    untagged.model_options.setdefault("transformer_options", {})[OVERRIDE_KEY] = lambda f, *a, **k: f(*a, **k)
    sample(tiny, apply_fastattn(untagged, plan))
    assert set(tags) == {None}, "an unknown previous override: unknown, left to the conservative estimate"


def test_modules_choosing_different_backends_are_refused_before_sampling(tiny, monkeypatch):
    flux_with_containers(monkeypatch, tiny.patcher, Backend(grid=8.0))
    attn = tiny.patcher.model.diffusion_model.double_blocks[0].img_attn
    monkeypatch.setattr(attn, "comfy_attention", ComfyAttention(Backend(grid=2.0).function), raising=False)
    steps = []
    with pytest.raises(MixedModuleBackends, match="different attention backends for different layers"):
        sample(tiny, apply_fastattn(tiny.patcher, plan_for(tiny, uniform(tiny, "W"))),
               callback=lambda step, *a: steps.append(step))
    assert not steps, "refused before the first step"


# --- core Model Sparse Attention -------------------------------------------------------------------


def sparse_at(tiny, first: int, last: int) -> SparsePatch:
    """Core sparse attention whose sigma window holds steps ``first``..``last`` of the tiny model's
    STEPS-step schedule, and no other."""
    import comfy.samplers

    sigmas = comfy.samplers.calculate_sigmas(tiny.patcher.get_model_object("model_sampling"), "normal", STEPS)
    sigmas = sigmas.tolist()
    start = (sigmas[first - 1] + sigmas[first]) / 2 if first else sigmas[0] + 1
    return SparsePatch(sigma_start=start, sigma_end=(sigmas[last] + sigmas[last + 1]) / 2)


@pytest.mark.parametrize("order", ["sparse, then FastAttn", "FastAttn, then sparse"])
def test_core_sparse_attention_in_either_order_all_full_is_bit_exact(tiny, hooked_full, order):
    def with_sparse(model):
        return model_sparse_attention(model, sparse_at(tiny, 1, 2))

    expected = sample(tiny, with_sparse(tiny.patcher))
    assert not torch.equal(expected, sample(tiny)), "core sparse attention computed some calls"
    if order == "sparse, then FastAttn":
        model = apply_fastattn(with_sparse(tiny.patcher), full(tiny))
    else:
        model = with_sparse(apply_fastattn(tiny.patcher, full(tiny)))
    assert torch.equal(sample(tiny, model), expected)


@pytest.mark.parametrize("order", ["sparse, then FastAttn", "FastAttn, then sparse"])
def test_core_sparse_computes_its_steps_and_fastattn_caches_skip_them(tiny, caplog, monkeypatch, order):
    """Core sparse attention takes the steps inside its sigma window; FastAttn compresses the
    others, and a reuse that would read a layer core computed is a miss (FULL), never an older
    output; the run says so."""
    caplog.set_level(logging.INFO, logger="ditfastattn")
    reused = []
    original = RunState.previous_output

    def spy(self, step, key, shape):
        out = original(self, step, key, shape)
        if out is not None:
            reused.append((step, step - 1 if self.outputs[key].get(step - 1) is out else None))
        return out

    monkeypatch.setattr(RunState, "previous_output", spy)
    patch = sparse_at(tiny, 2, 2)
    plan = plan_for(tiny, uniform(tiny, "T"))
    if order == "sparse, then FastAttn":
        model = apply_fastattn(model_sparse_attention(tiny.patcher, patch), plan)
    else:
        model = model_sparse_attention(apply_fastattn(tiny.patcher, plan), patch)
    out = sample(tiny, model)
    assert torch.isfinite(out).all()
    stats = run_stats(caplog)
    layers = len(uniform(tiny, "T")[0])
    assert patch.computed > 0 and stats.get("outer_computed", 0) == patch.computed, (patch.computed, stats)
    assert stats.get("ast_outer", 0) > 0, f"the step after core's reads what core computed: {stats}"
    assert stats.get("reuse", 0) > 0, "FastAttn still reused outputs at the steps it computed"
    assert reused and all(src == step - 1 for step, src in reused), reused
    assert stats["outer_computed"] % layers == 0 and patch.handed_on > 0
    messages = [r.getMessage() for r in caplog.records]
    assert any("core Model Sparse Attention is in this graph" in m for m in messages)
    assert any("computed the layer at the step AST or WA-RS reads" in m for m in messages)


def test_calibration_refuses_core_sparse_attention_in_front_of_it(tiny):
    from ditfastattn_core.comfy_bridge.calibration import CalibrationRequest, calibrate

    request = CalibrationRequest(seed=0, steps=STEPS, cfg=3.0, sampler_name="euler", scheduler="normal",
                                 mode="fast", delta=0.1)
    with pytest.raises(ValueError, match="connect the model before Model Sparse Attention"):
        calibrate(model_sparse_attention(tiny.patcher, sparse_at(tiny, 1, 2)), tiny.positive, tiny.negative,
                  {"samples": tiny.latent}, request)
    backend_after = model_sparse_attention(tiny.patcher, sparse_at(tiny, 1, 2))
    set_model_optimized_attention(backend_after, Backend(grid=4.0).function)
    with pytest.raises(ValueError, match="connect the model before Model Sparse Attention"):
        calibrate(backend_after, tiny.positive, tiny.negative, {"samples": tiny.latent}, request)


def test_the_apply_node_says_which_of_the_two_computes(tiny, pack):
    from ditfastattn_core.comfy_bridge.attention_chain import CORE_SPARSE_ORDER

    plan = plan_for(tiny, uniform(tiny, "W"))
    with_sparse = model_sparse_attention(tiny.patcher, sparse_at(tiny, 1, 2))
    summary = pack["DiTFastAttn_Apply"].execute(with_sparse, plan, "auto", "strict").ui["ditfastattn_plan"][0]["summary"]
    assert CORE_SPARSE_ORDER in summary
    plain = pack["DiTFastAttn_Apply"].execute(tiny.patcher, plan, "auto", "strict").ui["ditfastattn_plan"][0]["summary"]
    assert CORE_SPARSE_ORDER not in plain
