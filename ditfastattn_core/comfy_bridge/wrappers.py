"""The sampler hook: the keyed OUTER_SAMPLE and APPLY_MODEL wrappers every install adds.

OUTER_SAMPLE creates the run from the installed config on a per-run copy of the model
options, attaches the attention override there (outermost, chaining whatever override the
graph set, also one set after Apply), and frees everything in ``finally``. APPLY_MODEL starts
each model call and puts it in the ``CallSlot`` where the attention hooks find it.
"""

from __future__ import annotations

from collections.abc import Callable

from .attention_hooks import CallSlot, is_ours, make_override
from .families import OVERRIDE
from .keys import CONFIG_KEY, OVERRIDE_KEY, RUN_KEY
from .run import Run


def make_outer_sample_wrapper(slot: CallSlot) -> Callable:
    def fastattn_outer_sample(executor, *args, **kwargs):
        import comfy.model_patcher

        guider = executor.class_obj
        original_options = guider.model_options
        guider.model_options = comfy.model_patcher.create_model_options_clone(original_options)
        options = guider.model_options.setdefault("transformer_options", {})
        config = options.get(CONFIG_KEY)
        run: Run | None = None
        try:
            if config is not None:
                run = config.start_run(args[3], tuple(args[0].shape))
                options[RUN_KEY] = run
                current = options.get(OVERRIDE_KEY)
                if config.geometry.attach == OVERRIDE and not is_ours(current):
                    options[OVERRIDE_KEY] = make_override(current, slot)
            return executor(*args, **kwargs)
        finally:
            if run is not None:
                run.finish()
            options.pop(RUN_KEY, None)
            guider.model_options = original_options

    return fastattn_outer_sample


def make_apply_model_wrapper(slot: CallSlot) -> Callable:
    def fastattn_apply_model(executor, x, t, c_concat=None, c_crossattn=None, control=None,
                             transformer_options=None, **kwargs):
        run: Run | None = (transformer_options or {}).get(RUN_KEY)
        if run is None:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        slot.current = run.begin_call(x, t, c_crossattn, transformer_options, kwargs)
        try:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        finally:
            slot.current = None

    return fastattn_apply_model
