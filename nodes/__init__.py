"""V3 node definitions (thin: schema, validation, a call into the core)."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .apply import ApplyFastAttn


class FastAttnExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [ApplyFastAttn]
