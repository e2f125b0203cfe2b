"""Installing FastAttn on a ModelPatcher clone: apply a plan, or prepare a calibration run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..kernels import usable_kernel
from ..plan import Plan
from ..steps import STRICT, StepMapper
from ..strategies import Strategy
from ..window import WindowSpec
from .attention_hooks import MODULE_PATCHERS, is_ours, make_override
from .families import OVERRIDE, Geometry, resolve
from .run import (
    CONFIG_KEY,
    KEY,
    OVERRIDE_KEY,
    CalibrationConfig,
    CalibrationSink,
    CallSlot,
    FastAttnConfig,
    PlanMismatchError,
)
from .wrappers import fastattn_calc_cond_batch, fastattn_outer_sample, make_apply_model_wrapper


def model_geometry(model: Any) -> Geometry:
    """A ModelPatcher's family and attention geometry, detected once (before sampling)."""
    return resolve(model.model)


def check_plan(model: Any, plan: Plan) -> Geometry:
    """The model's geometry, after checking that ``plan`` was made for this model."""
    geometry = model_geometry(model)
    if plan.family != geometry.family:
        raise PlanMismatchError(
            f"the plan is for a {plan.family} model but this is a {geometry.label} ({geometry.family}) model: "
            "load the plan made for this model, or calibrate one with Calibrate FastAttn Plan"
        )
    if plan.layers != geometry.layers:
        raise PlanMismatchError(
            f"the plan has {plan.layers} attention layers but this {geometry.label} model has "
            f"{geometry.layers}: it was calibrated on another model size; recalibrate for this model"
        )
    return geometry


def apply_fastattn(model: Any, plan: Plan, kernel: str = "auto", step_mode: str = STRICT) -> Any:
    """A clone of ``model`` (a ModelPatcher) that samples with ``plan``."""
    StepMapper.for_run(plan.sigmas, plan.sigmas, step_mode)  # validates the mode
    geometry = check_plan(model, plan)
    kernel = usable_kernel(kernel, model.load_device)
    config = FastAttnConfig(plan=plan, geometry=geometry, kernel=kernel, step_mode=step_mode)
    return _install(model, config)


def _install(model: Any, config: FastAttnConfig | CalibrationConfig) -> Any:
    """A clone of ``model`` with ``config`` installed. On a model that already carries
    FastAttn (two Apply nodes in a row, Calibrate after Apply), the new config replaces the
    old one: attention goes through the pack once, other overrides stay chained."""
    import comfy.patcher_extension as ext

    m = model.clone()
    for wrapper_type in (ext.WrappersMP.OUTER_SAMPLE, ext.WrappersMP.APPLY_MODEL, ext.WrappersMP.CALC_COND_BATCH):
        m.remove_wrappers_with_key(wrapper_type, KEY)
    options = m.model_options.setdefault("transformer_options", {})
    options[CONFIG_KEY] = config
    slot = CallSlot()
    if config.geometry.attach == OVERRIDE:
        previous = options.get(OVERRIDE_KEY)
        options[OVERRIDE_KEY] = make_override(previous.previous if is_ours(previous) else previous)
    else:
        MODULE_PATCHERS[config.geometry.attach](m, config.geometry, slot)
    m.add_wrapper_with_key(ext.WrappersMP.OUTER_SAMPLE, KEY, fastattn_outer_sample)
    m.add_wrapper_with_key(ext.WrappersMP.APPLY_MODEL, KEY, make_apply_model_wrapper(slot))
    if isinstance(config, CalibrationConfig):
        m.add_wrapper_with_key(ext.WrappersMP.CALC_COND_BATCH, KEY, fastattn_calc_cond_batch)
    return m


def calibration_patch(
    model: Any,
    *,
    mode: str,
    delta: float,
    candidates: tuple[Strategy, ...],
    window: WindowSpec,
    sink: CalibrationSink,
    kernel: str = "auto",
    on_progress: Callable[[], None] | None = None,
    geometry: Geometry | None = None,
) -> Any:
    """A clone of ``model`` whose next sampling run calibrates a plan into ``sink``
    (``geometry``: the model's, when the caller has resolved it already)."""
    config = CalibrationConfig(
        geometry=geometry or model_geometry(model), mode=mode, delta=delta, candidates=candidates,
        window=window, sink=sink, kernel=usable_kernel(kernel, model.load_device), on_progress=on_progress,
    )
    return _install(model, config)
