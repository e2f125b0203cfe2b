"""DiTFastAttn for diffusion transformers: torch only, no ComfyUI import at module level.

Roles (diffusers-hooks style): ``Plan`` is the config, ``RunState`` the per-run caches with
``reset()``, ``attend`` the behaviour for one attention call; ``ditfastattn_core.comfy``
installs it into ComfyUI.
"""

__version__ = "0.1.0"

from .context import CallContext, Chunk  # noqa: E402
from .cost import CostSummary, strategy_cost, summarize  # noqa: E402
from .engine import attend, sdpa_dense  # noqa: E402
from .kernels import kernel_names, select_kernel  # noqa: E402
from .loss import relative_l1, relative_squared_error  # noqa: E402
from .plan import Calibration, Plan, PlanError  # noqa: E402
from .schedule import Schedule  # noqa: E402
from .state import RunState  # noqa: E402
from .strategies import CANDIDATE_ORDER, COND, UNCOND, Strategy  # noqa: E402
from .window import TokenLayout, Window, WindowSpec  # noqa: E402

__all__ = [
    "CANDIDATE_ORDER",
    "COND",
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
    "strategy_cost",
    "summarize",
]
