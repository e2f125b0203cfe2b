"""Installing FastAttn on a ModelPatcher clone: apply a plan, or prepare a calibration run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..kernels import usable_kernel
from ..plan import Plan
from ..steps import STRICT, StepMapper
from ..strategies import Strategy
from ..window import WindowSpec
from .attention_hooks import is_ours, make_override, make_pixart_self_attention
from .families import Family, UnsupportedModelError, detect_family, layer_count
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

_UNSUPPORTED_CLASSES = {"WAN22_S2V": "Wan 2.2 S2V blocks do not pass transformer_options to attention"}


def check_plan(model: Any, plan: Plan) -> Family:
    """The model's family, after checking that ``plan`` was made for this model."""
    family, layers = model_family(model)
    if plan.family != family.name:
        raise PlanMismatchError(
            f"the plan is for a {plan.family} model but this is a {family.name} model: "
            "load the plan made for this model, or calibrate one with Calibrate FastAttn Plan"
        )
    if plan.layers != layers:
        raise PlanMismatchError(
            f"the plan has {plan.layers} attention layers but this {family.name} model has "
            f"{layers}: it was calibrated on another model size; recalibrate for this model"
        )
    return family


def apply_fastattn(model: Any, plan: Plan, kernel: str = "auto", step_mode: str = STRICT) -> Any:
    """A clone of ``model`` (a ModelPatcher) that samples with ``plan``."""
    StepMapper.for_run(plan.sigmas, plan.sigmas, step_mode)  # validates the mode
    family = check_plan(model, plan)
    kernel = usable_kernel(kernel, model.load_device)
    config = FastAttnConfig(plan=plan, family=family.name, kernel=kernel, step_mode=step_mode)
    return _install(model, config, family)


def _install(model: Any, config: FastAttnConfig | CalibrationConfig, family: Family) -> Any:
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
    if family.patched_modules:
        for i in range(config.layers):
            name = f"diffusion_model.blocks.{i}.attn"
            module = m.get_model_object(name)
            if getattr(module, "sr_ratio", 1) > 1:
                raise UnsupportedModelError("PixArt with KV compression (sr_ratio > 1) is not supported")
            m.add_object_patch(f"{name}.forward", make_pixart_self_attention(module, slot))
    else:
        previous = options.get(OVERRIDE_KEY)
        options[OVERRIDE_KEY] = make_override(previous.previous if is_ours(previous) else previous)
    m.add_wrapper_with_key(ext.WrappersMP.OUTER_SAMPLE, KEY, fastattn_outer_sample)
    m.add_wrapper_with_key(ext.WrappersMP.APPLY_MODEL, KEY, make_apply_model_wrapper(slot))
    if isinstance(config, CalibrationConfig):
        m.add_wrapper_with_key(ext.WrappersMP.CALC_COND_BATCH, KEY, fastattn_calc_cond_batch)
    return m


def model_family(model: Any) -> tuple[Family, int]:
    """The family of a ModelPatcher's model and its number of compressible layers."""
    base = model.model
    name = type(base).__name__
    if name in _UNSUPPORTED_CLASSES:
        raise UnsupportedModelError(f"{name} is not supported: {_UNSUPPORTED_CLASSES[name]}")
    family = detect_family(base)
    return family, layer_count(base, family)


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
) -> Any:
    """A clone of ``model`` whose next sampling run calibrates a plan into ``sink``."""
    family, layers = model_family(model)
    config = CalibrationConfig(
        family=family.name, layers=layers, mode=mode, delta=delta, candidates=candidates,
        window=window, sink=sink, kernel=usable_kernel(kernel, model.load_device), on_progress=on_progress,
    )
    return _install(model, config, family)
