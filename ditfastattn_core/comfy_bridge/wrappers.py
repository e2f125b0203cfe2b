"""The sampler hook: the keyed wrappers every install adds.

OUTER_SAMPLE creates the run from the installed config on a per-run copy of the model
options, attaches the attention override there (outermost, chaining whatever override the
graph set, also one set after Apply) or, on a raylight worker under sequence parallelism, the
route into xfuser's attention (``raylight.open_route``), and frees everything in ``finally``. PREDICT_NOISE and
CALC_COND_BATCH tell the run's ``SiteTracker`` which of a step's model calls comes next (the
sampler's own, a context window, a guidance call) and hand each calc_cond_batch to the run
(calibration decides there). APPLY_MODEL starts each model call and puts it in the
``CallSlot`` where the attention hooks find it, and runs a compiled model call that never
reached the hooks again, recompiled (``ran_stale_graph``).
"""

from __future__ import annotations

from collections.abc import Callable

from .attention_chain import (
    CORE_SPARSE_ORDER,
    describe,
    has_core_sparse_attention,
    memory_efficient,
    outer_sparse_patch,
    preferred_backend,
)
from .attention_hooks import CallSlot, is_ours, make_override
from .call_sites import replaced_blocks
from .families import OVERRIDE
from .keys import COMPILE_WRAPPER_KEY, CONFIG_KEY, OVERRIDE_KEY, RUN_KEY
from .raylight import SequenceRoute, open_route
from .run import ModelCall, Run


def make_outer_sample_wrapper(slot: CallSlot) -> Callable:
    overrides: list[Callable] = []
    """The override of the last run, used again while it chains the same override: the same
    object from run to run, so torch.compile's guards on it hold and its graphs are reused."""

    def override_chaining(current: Callable | None) -> Callable:
        if not overrides or overrides[0].previous is not current:
            overrides[:] = [make_override(current, slot)]
        return overrides[0]

    def fastattn_outer_sample(executor, *args, **kwargs):
        import comfy.model_patcher

        guider = executor.class_obj
        original_options = guider.model_options
        guider.model_options = comfy.model_patcher.create_model_options_clone(original_options)
        options = guider.model_options.setdefault("transformer_options", {})
        config = options.get(CONFIG_KEY)
        run: Run | None = None
        route: SequenceRoute | None = None
        try:
            if config is not None:
                run = config.start_run(args[3], tuple(args[0].shape), guider.model_options)
                run.sites.base_replaced = replaced_blocks(options)
                options[RUN_KEY] = run
                if run.hooks_attention:
                    route = open_route(run, guider.model_patcher, slot)  # on a raylight worker
                current = options.get(OVERRIDE_KEY)
                if config.geometry.attach == OVERRIDE and run.hooks_attention and route is None \
                        and not is_ours(current):
                    run.preferred_attention = preferred_backend(guider.model_patcher.model.diffusion_model)
                    override = options[OVERRIDE_KEY] = override_chaining(current)
                    override.memory_efficient = memory_efficient(current, guider.model_options)
                    if has_core_sparse_attention(guider.model_patcher):
                        run.report("core_sparse", CORE_SPARSE_ORDER)
            return executor(*args, **kwargs)
        finally:
            if route is not None:
                route.close(run)
            if run is not None:
                run.finish()
            options.pop(RUN_KEY, None)
            guider.model_options = original_options

    return fastattn_outer_sample


def fastattn_predict_noise(executor, *args, **kwargs):
    """A model evaluation of the sampler starts: its calc_cond_batch calls count from 0."""
    run: Run | None = executor.class_obj.model_options.get("transformer_options", {}).get(RUN_KEY)
    if run is not None:
        run.sites.new_evaluation()
    return executor(*args, **kwargs)


def fastattn_calc_cond_batch(executor, model, conds, x_in, timestep, model_options):
    """One calc_cond_batch (per context window): its guidance rank and cond lists, then the run's
    own handling of it (a calibration run decides its step there)."""
    run: Run | None = model_options.get("transformer_options", {}).get(RUN_KEY)
    if run is None:
        return executor(model, conds, x_in, timestep, model_options)
    run.sites.enter(model_options.get("transformer_options", {}), len(conds))
    try:
        return run.calc_cond_batch(executor, model, conds, x_in, timestep, model_options)
    finally:
        run.sites.leave()


def make_apply_model_wrapper(slot: CallSlot) -> Callable:
    def fastattn_apply_model(executor, x, t, c_concat=None, c_crossattn=None, control=None,
                             transformer_options=None, **kwargs):
        run: Run | None = (transformer_options or {}).get(RUN_KEY)
        if run is None:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        call = run.begin_call(x, t, c_crossattn, transformer_options, kwargs)
        if not run.hooks_attention:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        slot.current = call
        try:
            out = executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
            account_outer_override(call, transformer_options)
            if ran_stale_graph(call, transformer_options):
                import torch

                run.report("stale_graph", "this torch.compile'd model had graphs compiled without FastAttn (ComfyUI's "
                           "TorchCompileModel does not recompile when only attention patches change): FastAttn "
                           "dropped torch.compile's cache and ran the model call again, which compiles it with "
                           "FastAttn once")
                torch.compiler.reset()
                call.restart()
                out = executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
                if ran_stale_graph(call, transformer_options):
                    raise StaleCompiledGraphError(
                        "FastAttn: this torch.compile'd model runs a graph that never calls FastAttn's attention "
                        "hooks, even after recompiling, so the plan cannot be applied: put Apply FastAttn after "
                        "TorchCompileModel, or sample without TorchCompileModel")
        finally:
            slot.current = None
        return out

    return fastattn_apply_model


def account_outer_override(call: ModelCall, options: dict) -> None:
    """Count the compressible layers of a model call that never reached FastAttn because an
    override set around FastAttn's during sampling (core Model Sparse Attention re-installs
    itself at every step) computed them itself; a cache read from one of them is a miss
    (``RunState.note_outer``) and the run says so once."""
    outer = options.get(OVERRIDE_KEY)
    run = call.run
    if outer is None or is_ours(outer) or call.step is None or call.grid is None or run.full_reason is not None:
        return
    missing = set(range(run.geometry.layers)) - call.layers_done
    if not missing:
        return
    call.state.count("outer_computed", len(missing))
    call.state.note_outer(call.step, call.site, missing)
    what = describe(outer)
    run.report(f"outer {what}", (
        f"{what} computed layers itself that FastAttn's plan compresses (it sits around FastAttn's attention and "
        "did not hand them on): those layer calls ran as it computes them, and FastAttn's caches skip them"
        + ("" if outer_sparse_patch(outer) is not None else
           "; if that override should not run, remove the node that sets it")))


class StaleCompiledGraphError(RuntimeError):
    """A torch.compile'd model whose graphs never call FastAttn's hooks, even after recompiling."""


def ran_stale_graph(call: ModelCall, options: dict) -> bool:
    """Whether a model call of a torch.compile'd model ran without any attention call reaching
    the pack although its image self-attention should have (it ran FULL, silently).

    ComfyUI's TorchCompileModel (0.29.0; ``guard_filter_fn`` in ``nodes_torch_compile.py``)
    tells dynamo not to guard on transformer_options, where the attention override lives, and
    dynamo keeps compiled graphs per code object and equal backend. So graphs compiled before
    Apply FastAttn was added (or from a run without it) are reused by a FastAttn run without
    ever calling the override; dropping them and calling again compiles with the hooks."""
    if call.layers_seen or call.grid is None:
        return False
    import comfy.patcher_extension

    return COMPILE_WRAPPER_KEY in options.get("wrappers", {}).get(comfy.patcher_extension.WrappersMP.APPLY_MODEL, {})
