"""The only code that knows ComfyUI. It imports ComfyUI lazily, inside the functions that run
in a ComfyUI process, so importing it elsewhere is harmless."""

from .families import FAMILIES, Family, UnsupportedModelError, detect_family, layer_count
from .hook import (
    CalibrationSink,
    FastAttnConfig,
    PlanMismatchError,
    apply_fastattn,
    calibration_patch,
    check_plan,
    model_family,
)

__all__ = [
    "FAMILIES",
    "CalibrationSink",
    "calibration_patch",
    "model_family",
    "FastAttnConfig",
    "Family",
    "PlanMismatchError",
    "UnsupportedModelError",
    "apply_fastattn",
    "check_plan",
    "detect_family",
    "layer_count",
]
