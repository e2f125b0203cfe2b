"""The only code that knows ComfyUI. It imports ComfyUI lazily, inside the functions that run
in a ComfyUI process, so importing it elsewhere is harmless."""

from .apply import ApplyConfig, ApplyRun, PlanMismatchError, apply_config, apply_fastattn, check_plan
from .calibration import CalibrationConfig, CalibrationRun, CalibrationSink, calibration_patch
from .families import FAMILIES, Family, Geometry, UnsupportedModelError, detect_family, layer_count, resolve
from .install import install, model_geometry
from .run import ModelCall, Run

__all__ = [
    "FAMILIES",
    "ApplyConfig",
    "ApplyRun",
    "CalibrationConfig",
    "CalibrationRun",
    "CalibrationSink",
    "Family",
    "Geometry",
    "PlanMismatchError",
    "UnsupportedModelError",
    "apply_config",
    "apply_fastattn",
    "calibration_patch",
    "check_plan",
    "detect_family",
    "install",
    "layer_count",
    "ModelCall",
    "Run",
    "model_geometry",
    "resolve",
]
