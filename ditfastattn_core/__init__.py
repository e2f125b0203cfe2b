"""DiTFastAttn for diffusion transformers: torch only, no ComfyUI import at module level.

Roles (diffusers-hooks style): ``Plan`` is the config, ``RunState`` the per-run caches with
``reset()``, ``attend`` the behaviour for one attention call; ``ditfastattn_core.comfy``
installs it into ComfyUI.
"""

from .cache_memory import AttentionSize, CacheEstimate, estimate_cache_memory
from .context import CallContext, Chunk
from .cost import CostSummary, summarize
from .engine import attend, sdpa_dense
from .kernels import kernel_names, select_kernel
from .loss import relative_l1, relative_squared_error
from .plan import Calibration, Plan, PlanError
from .schedule import Schedule
from .state import CachePlacement, RunState
from .strategies import CANDIDATE_ORDER, COND, UNCOND, Cache, Compute, Strategy
from .version import __version__  # noqa: F401
from .window import TokenLayout, Window, WindowSpec

__all__ = [
    "AttentionSize",
    "CacheEstimate",
    "CachePlacement",
    "estimate_cache_memory",
    "CANDIDATE_ORDER",
    "COND",
    "Cache",
    "Compute",
    "UNCOND",
    "Calibration",
    "CallContext",
    "Chunk",
    "CostSummary",
    "Plan",
    "PlanError",
    "RunState",
    "Schedule",
    "Strategy",
    "TokenLayout",
    "Window",
    "WindowSpec",
    "attend",
    "kernel_names",
    "relative_l1",
    "relative_squared_error",
    "sdpa_dense",
    "select_kernel",
    "summarize",
]
