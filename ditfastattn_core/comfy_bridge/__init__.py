"""The only code that knows ComfyUI. It imports ComfyUI lazily, inside the functions that run
in a ComfyUI process, so importing it elsewhere is harmless."""

from .families import FAMILIES, Family, UnsupportedModelError, detect_family, layer_count
from .hook import FastAttnConfig, PlanMismatchError, apply_fastattn, check_plan

__all__ = [
    "FAMILIES",
    "FastAttnConfig",
    "Family",
    "PlanMismatchError",
    "UnsupportedModelError",
    "apply_fastattn",
    "check_plan",
    "detect_family",
    "layer_count",
]
