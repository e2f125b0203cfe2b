"""GET /ditfastattn/legend: the strategy legend (Strategy table), for a plan pasted into Load
Plan's embedded_plan before any node has run; node results carry their own copy."""

from __future__ import annotations

import sys

from aiohttp import web

from ..ditfastattn_core.strategies import legend


def register() -> None:
    # main.py imports ComfyUI's server before it loads custom nodes; without it (tests,
    # scripts) there is nothing to serve, and importing it here would start its imports.
    module = sys.modules.get("server")
    server = getattr(getattr(module, "PromptServer", None), "instance", None)
    if server is None:
        return

    @server.routes.get("/ditfastattn/legend")
    async def strategy_legend(request: web.Request) -> web.Response:
        return web.json_response(legend())
