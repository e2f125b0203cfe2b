"""GET /ditfastattn/legend: the strategy legend (Strategy table), for a plan pasted into Load
Plan's embedded_plan before any node has run; node results carry their own copy."""

from __future__ import annotations

from aiohttp import web

from ..ditfastattn_core.strategies import legend


def register() -> None:
    from server import PromptServer

    server = getattr(PromptServer, "instance", None)
    if server is None:  # loaded without a server (tests, scripts): nothing to serve
        return

    @server.routes.get("/ditfastattn/legend")
    async def strategy_legend(request: web.Request) -> web.Response:
        return web.json_response(legend())
