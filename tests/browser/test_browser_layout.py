"""What a new user sees when opening and running the demo templates, in a real browser: every
node readable, nothing overlapping, nothing clipped, no error from the pack; in the classic
canvas and in Nodes 2.0 (frontends that have it). Judged from the page (node rectangles and the
pack's DOM elements), and saved as screenshots in tests/artifacts/ for a person to look at."""

from __future__ import annotations

import json

import pytest

from tests.browser.test_browser_heatmap import (
    ARTIFACTS,
    ROOT,
    VERSION,
    _frontend_version,
    _open,
    _pack_errors,
    _why_skip,
    queue_in_page,
)
from tests.comfy_server import ComfyServer

pytestmark = pytest.mark.skipif(_why_skip() is not None, reason=_why_skip() or "")

DEMOS = ("FastAttn demo - calibrate", "FastAttn demo - saved plan")
MODES = ("classic", "nodes2")


def _run_template(page, server: ComfyServer, name: str) -> None:
    """Open the template as the template browser does (its JSON into loadGraphData) and run it."""
    workflow = json.loads((ROOT / "example_workflows" / f"{name}.json").read_text())
    server.free()  # every node runs (a cached node sends no result to draw)
    queue_in_page(page, server, "loadGraphData", workflow, settle_ms=2000)  # results drawn, nodes grown


def _fit_view(page) -> None:
    """Every node on screen at a zoom where both frontends draw text (old ones draw boxes only
    below about 60%)."""
    page.set_viewport_size({"width": 2600, "height": 1700})
    page.evaluate(
        """() => {
            const nodes = window.app.graph.nodes;
            const title = window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
            const x0 = Math.min(...nodes.map((n) => n.pos[0])), y0 = Math.min(...nodes.map((n) => n.pos[1] - title));
            const x1 = Math.max(...nodes.map((n) => n.pos[0] + n.size[0]));
            const y1 = Math.max(...nodes.map((n) => n.pos[1] + n.size[1]));
            const ds = window.app.canvas.ds;
            ds.scale = Math.min(1, 2400 / (x1 - x0 + 40), 1520 / (y1 - y0 + 40));
            ds.offset = [130 / ds.scale - x0, 120 / ds.scale - y0];  // clear of the side bar and the toolbars
            window.app.graph.setDirtyCanvas(true, true);
        }"""
    )
    page.wait_for_timeout(1500)


def _node_rects(page, nodes2: bool) -> list[dict]:
    """Every node's rectangle as drawn: Nodes 2.0's DOM elements, else the graph's node boxes
    (title included), in screen pixels."""
    if nodes2:
        return page.evaluate(
            """() => [...document.querySelectorAll('[data-node-id]')].map((el) => {
                const r = el.getBoundingClientRect();
                const node = window.app.graph.getNodeById(Number(el.dataset.nodeId));
                return {id: el.dataset.nodeId, type: node?.type, x: r.x, y: r.y, w: r.width, h: r.height,
                        overflow: el.scrollHeight - el.clientHeight};
            })"""
        )
    return page.evaluate(
        """() => {
            const ds = window.app.canvas.ds, title = window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
            return window.app.graph.nodes.map((n) => ({
                id: String(n.id), type: n.type, x: (n.pos[0] + ds.offset[0]) * ds.scale,
                y: (n.pos[1] - title + ds.offset[1]) * ds.scale, w: n.size[0] * ds.scale,
                h: (n.size[1] + title) * ds.scale, overflow: 0}));
        }"""
    )


def _overlaps(rects: list[dict]) -> list[tuple[str, str]]:
    found = []
    for i, a in enumerate(rects):
        for b in rects[i + 1:]:
            dx = min(a["x"] + a["w"], b["x"] + b["w"]) - max(a["x"], b["x"])
            dy = min(a["y"] + a["h"], b["y"] + b["h"]) - max(a["y"], b["y"])
            if dx > 2 and dy > 2:
                found.append((f"{a['type']} #{a['id']}", f"{b['type']} #{b['id']}"))
    return found


def _clipped_heatmaps(page) -> list[str]:
    """The pack's heatmap widgets whose content (heatmap, legend, summary) does not fit them."""
    return page.evaluate(
        """() => [...document.querySelectorAll('.ditfastattn-heatmap')]
            .filter((el) => el.offsetParent !== null)
            .filter((el) => el.scrollHeight > el.clientHeight + 1
                || [...el.children].some((c) => c.getBoundingClientRect().bottom > el.getBoundingClientRect().bottom + 1))
            .map((el) => el.textContent.slice(-120))"""
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", DEMOS)
def test_demo_template_is_readable_after_a_run(server, browser, name, mode):
    nodes2 = mode == "nodes2"
    if nodes2 and _frontend_version() < (1, 30):
        pytest.skip(f"this frontend (ComfyUI {VERSION}) has no Nodes 2.0")
    page, errors = _open(browser, server, vue_nodes=nodes2)
    console = []
    page.on("console", lambda m: console.append(m.text) if m.type == "error" and "ditfastattn" in m.text else None)
    try:
        _run_template(page, server, name)
        _fit_view(page)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"layout {VERSION} {mode} {name}.png"))
        rects = _node_rects(page, nodes2)
        assert len(rects) == page.evaluate("() => window.app.graph.nodes.length")
        assert _overlaps(rects) == [], "nodes overlap"
        assert _clipped_heatmaps(page) == [], "a heatmap widget clips its content"
        if nodes2:  # a node element's own frame overflows by a few pixels: core nodes set the bar
            frame = max(r["overflow"] for r in rects if not r["type"].startswith("DiTFastAttn_"))
            clipped = [r for r in rects if r["type"].startswith("DiTFastAttn_") and r["overflow"] > frame]
            assert clipped == [], "a pack node's content overflows it"
        plan_nodes = page.evaluate(
            "() => window.app.graph.nodes.filter((n) => n.fastattnView).map((n) => n.type)")
        assert plan_nodes and set(plan_nodes) <= {"DiTFastAttn_Calibrate", "DiTFastAttn_SavePlan",
                                                  "DiTFastAttn_LoadPlan", "DiTFastAttn_Apply"}
        assert not any(t.startswith("DiTFastAttn_Demo") for t in plan_nodes), "a demo helper got a heatmap"
        assert _pack_errors(errors) == [] and console == [], (errors, console)
    finally:
        page.close()


def test_every_template_has_its_thumbnail_on_the_server(server):
    """What the template browser fetches for each card: <name>.jpg from the pack's template route."""
    import urllib.parse
    import urllib.request

    templates = server.get("/workflow_templates")
    (names,) = [v for k, v in templates.items() if "ditfastattn" in k]
    assert set(DEMOS) <= set(names)
    module = next(k for k in templates if "ditfastattn" in k)
    for name in names:
        url = f"{server.url}/api/workflow_templates/{urllib.parse.quote(module)}/{urllib.parse.quote(name)}.jpg"
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.status == 200 and response.headers["Content-Type"] == "image/jpeg", name


def test_template_browser_shows_readable_cards_with_thumbnails(server, browser):
    """The template browser's cards for the pack: the whole title visible, the thumbnail loaded,
    and no failed request for anything of the pack's."""
    page, errors = _open(browser, server, vue_nodes=False)
    failed: list[str] = []
    thumbnails: list[str] = []

    def seen(response) -> None:
        if "ditfastattn" in response.url:
            (failed if response.status >= 400 else thumbnails if response.url.endswith(".jpg") else []).append(
                response.url)

    page.on("response", seen)
    try:
        page.evaluate("async () => { await window.app.extensionManager.command.execute('Comfy.BrowseTemplates'); }")
        page.wait_for_timeout(3000)
        category = page.get_by_text("comfyui-ditfastattn", exact=False)
        if category.count():
            category.first.click()
            page.wait_for_timeout(2000)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"templates {VERSION}.png"))
        names = next(v for k, v in server.get("/workflow_templates").items() if "ditfastattn" in k)
        titles = page.evaluate(
            """(names) => [...document.querySelectorAll('*')]
                .filter((el) => el.children.length === 0 && names.includes(el.textContent.trim()))
                .map((el) => ({title: el.textContent.trim(), clipped: el.scrollWidth > el.clientWidth + 1}))""",
            names,
        )
        assert {t["title"] for t in titles} >= set(DEMOS), "the template browser shows no card for the demos"
        assert [t for t in titles if t["clipped"]] == [], "a card cuts its title off"
        assert thumbnails, "no thumbnail of the pack's was fetched"  # and none failed (below)
        assert failed == [], failed
        assert _pack_errors(errors) == []
    finally:
        page.close()


@pytest.mark.parametrize("mode", MODES)
def test_every_pack_node_at_its_default_size(server, browser, mode):
    """Each of the pack's nodes as the node library adds it (default size), side by side: the
    widgets and the heatmap placeholder fit, nothing overlaps."""
    nodes2 = mode == "nodes2"
    if nodes2 and _frontend_version() < (1, 30):
        pytest.skip(f"this frontend (ComfyUI {VERSION}) has no Nodes 2.0")
    page, errors = _open(browser, server, vue_nodes=nodes2)
    try:
        added = page.evaluate(
            """async () => {
                const app = window.app, LG = window.LiteGraph;
                app.graph.clear();
                const types = Object.keys(LG.registered_node_types).filter((t) => t.startsWith('DiTFastAttn_')).sort();
                let x = 40;
                for (const type of types) {
                    const node = LG.createNode(type);
                    node.pos = [x, 60];
                    app.graph.add(node);
                    x += node.size[0] + 80;
                }
                app.graph.setDirtyCanvas(true, true);
                return types;
            }"""
        )
        assert len(added) >= 7
        page.wait_for_timeout(1500)
        _fit_view(page)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"nodes {VERSION} {mode}.png"))
        rects = _node_rects(page, nodes2)
        assert _overlaps(rects) == [], "nodes overlap"
        assert _clipped_heatmaps(page) == [], "a heatmap widget clips its content"
        assert _pack_errors(errors) == []
    finally:
        page.close()
