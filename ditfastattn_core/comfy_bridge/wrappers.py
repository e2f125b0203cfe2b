"""The sampler hook: keyed OUTER_SAMPLE, APPLY_MODEL and CALC_COND_BATCH wrappers."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..calibrate import PaperCalibrator
from ..loss import relative_l1
from ..strategies import Strategy
from .attention_hooks import is_ours, make_override
from .families import OVERRIDE
from .run import CALL_KEY, CONFIG_KEY, OVERRIDE_KEY, RUN_KEY, CallSlot, FastAttnConfig, FastAttnRun


def make_apply_model_wrapper(slot: CallSlot) -> Callable:
    def fastattn_apply_model(executor, x, t, c_concat=None, c_crossattn=None, control=None,
                             transformer_options=None, **kwargs):
        options = transformer_options if transformer_options is not None else {}
        run: FastAttnRun | None = options.get(RUN_KEY)
        if run is None:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        call = run.begin_call(x, t, c_crossattn, options, kwargs)
        options[CALL_KEY] = call
        slot.current = call
        try:
            return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)
        finally:
            slot.current = None
            options.pop(CALL_KEY, None)

    return fastattn_apply_model


def fastattn_calc_cond_batch(executor, model, conds, x_in, timestep, model_options):
    """Calibration runs here, on every CFG branch at once, so that losses are the paper's
    whole-model output error whether ComfyUI batches cond and uncond or not.

    Paper mode: the reference, the trials (read-only) and the one writing forward of a step.
    Fast mode: the all-FULL reference (read-only), then the writing forward in which each
    layer chooses from local errors; its whole-output loss feeds the sensitivity scale."""
    run: FastAttnRun | None = model_options.get("transformer_options", {}).get(RUN_KEY)
    if run is None or not run.calibrating:
        return executor(model, conds, x_in, timestep, model_options)
    has_cfg = len(conds) > 1 and any(c is not None for c in conds[1:])
    cal = run.paper or run.fast or run.calibrator(has_cfg)
    step = run.steps.plan_step(float(timestep.reshape(-1)[0]))
    decided = cal.rows if isinstance(cal, PaperCalibrator) else cal.step_losses
    if step is None or step in decided:  # off-schedule, or a second call of a decided step
        run.row_override = cal.rows.get(step) if step is not None else None
        try:
            return executor(model, conds, x_in, timestep, model_options)
        finally:
            run.row_override = None
    written: list = []

    def forward(row: list[Strategy] | None, write: bool) -> torch.Tensor:
        run.row_override = row
        try:
            if write:
                outs = executor(model, conds, x_in, timestep, model_options)
                written.append(outs)
            else:
                with run.state.read_only():
                    outs = executor(model, conds, x_in, timestep, model_options)
        finally:
            run.row_override = None
        return torch.cat([o.reshape(-1) for o in outs if o is not None])

    if isinstance(cal, PaperCalibrator):
        cal.calibrate_step(step, forward)
    elif step == 0:  # all FULL: nothing to choose, nothing to learn from
        forward(None, True)
        cal.step_losses[step] = 0.0
    else:
        reference = forward([Strategy.FULL] * cal.layers, False)
        cal.feedback(step, relative_l1(reference, forward(None, True)))
    return written[-1]


def fastattn_outer_sample(executor, *args, **kwargs):
    """Creates the run's state, makes sure our override is the outermost one, frees all in
    ``finally`` (also when sampling is interrupted)."""
    import comfy.model_patcher

    guider = executor.class_obj
    original_options = guider.model_options
    guider.model_options = comfy.model_patcher.create_model_options_clone(original_options)
    options = guider.model_options.setdefault("transformer_options", {})
    config: FastAttnConfig | None = options.get(CONFIG_KEY)
    run = None
    try:
        if config is not None:
            run = FastAttnRun.start(config, args[3], tuple(args[0].shape))
            options[RUN_KEY] = run
            current = options.get(OVERRIDE_KEY)
            if config.geometry.attach == OVERRIDE and not is_ours(current):
                options[OVERRIDE_KEY] = make_override(current)
        return executor(*args, **kwargs)
    finally:
        if run is not None:
            run.finish()
        options.pop(RUN_KEY, None)
        guider.model_options = original_options
