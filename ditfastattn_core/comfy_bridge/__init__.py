"""The only code that knows ComfyUI. It imports ComfyUI lazily, inside the functions that run
in a ComfyUI process, so importing it elsewhere is harmless."""

from .families import FAMILIES, Family, Geometry, UnsupportedModelError, detect_family, layer_count, resolve
from .install import apply_fastattn, calibration_patch, check_plan, model_geometry
from .run import CalibrationSink, FastAttnConfig, FastAttnRun, PlanMismatchError

__all__ = [
    "FAMILIES",
    "CalibrationSink",
    "FastAttnConfig",
    "FastAttnRun",
    "Family",
    "Geometry",
    "PlanMismatchError",
    "UnsupportedModelError",
    "apply_fastattn",
    "calibration_patch",
    "check_plan",
    "detect_family",
    "layer_count",
    "model_geometry",
    "resolve",
]
