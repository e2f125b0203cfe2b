"""V3 node definitions (thin: schema, validation, a call into the core)."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import demo, plan_folder, routes
from .apply import ApplyFastAttn
from .calibrate import CalibratePlan
from .plans import LoadPlan, SavePlan
from .raylight import ApplyFastAttnRay

plan_folder.register()
demo.register()
routes.register()


class FastAttnExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [CalibratePlan, ApplyFastAttn, ApplyFastAttnRay, LoadPlan, SavePlan, demo.DemoClassConditioning,
                demo.DemoLatentToImage]
