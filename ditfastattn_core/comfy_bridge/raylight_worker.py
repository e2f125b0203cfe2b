"""What "Apply FastAttn (Ray)" sends to each raylight worker.

raylight runs a function on a worker's model with ``actor.model_function_runner.remote(fn,
*args)`` (the worker sets its model to ``fn(model, *args)``). A Ray worker is a process of its
own that never loaded the pack, so ``install_plan`` is sent *by value* (``by_value``): this
module imports nothing from the pack at module level, and the function loads the pack's core
from its folder on the worker (no ``sys.path`` change, so nothing in the pack's folder can
shadow a module of ComfyUI's) before installing the plan there. Only plain data travels with
it: the plan as JSON and the Apply options.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any

CORE = "ditfastattn_core"


def _load_core(pack_root: str) -> None:
    """Load the pack's core package from its folder, once per process."""
    if CORE in sys.modules:
        return
    folder = os.path.join(pack_root, CORE)
    spec = importlib.util.spec_from_file_location(CORE, os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[CORE] = module
    spec.loader.exec_module(module)


def install_plan(model: Any, pack_root: str, plan_json: dict, options: dict) -> Any:
    """On a raylight worker: ``model`` (the worker's ModelPatcher) with the plan installed,
    exactly as Apply FastAttn installs it on one GPU (the same checks, raised on the worker)."""
    _load_core(pack_root)
    bridge = importlib.import_module(f"{CORE}.comfy_bridge")
    plan = importlib.import_module(f"{CORE}.plan").Plan.from_json(plan_json)
    placement = importlib.import_module(f"{CORE}.state").CachePlacement(options["cache_placement"])
    return bridge.apply_fastattn(model, plan, kernel=options["kernel"], step_mode=options["step_mode"],
                                 cache_placement=placement)


def model_family(model: Any, pack_root: str) -> str:
    """On a raylight worker: the pack's family name of the worker's model."""
    _load_core(pack_root)
    return importlib.import_module(f"{CORE}.comfy_bridge").detect_family(model.model).name
