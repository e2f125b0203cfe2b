"""The editor in a real browser (Debian's chromium driven by Python playwright) against a real
ComfyUI server (tests/comfy_server.py): every example workflow loads with no missing node
types, and after a run the plan heatmap is visible, judged from the page's pixels, on every
node that carries a plan, in the classic canvas, after a reload, and in Nodes 2.0 (frontends
that have it). Screenshots go to tests/artifacts/ (git-ignored).

Install the browser with `.ci/install-browser`; without chromium or playwright these skip."""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from tests.comfy_server import SAMPLING, ComfyServer, tiny_graph

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "artifacts"
WORKFLOWS = sorted((ROOT / "example_workflows").glob("*.json"))
UI_WORKFLOWS = [p for p in WORKFLOWS if not p.name.endswith(".api.json")]
PLAN_NODES = ("DiTFastAttn_Calibrate", "DiTFastAttn_SavePlan", "DiTFastAttn_LoadPlan", "DiTFastAttn_Apply")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def _why_skip() -> str | None:
    if not COMFYUI_PATH:
        return "browser tests need COMFYUI_PATH (a ComfyUI tree)"
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        return f"browser tests need chromium at {CHROMIUM} (run .ci/install-browser)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "browser tests need playwright (run .ci/install-browser)"
    return None


pytestmark = pytest.mark.skipif(_why_skip() is not None, reason=_why_skip() or "")
VERSION = Path(COMFYUI_PATH).name if COMFYUI_PATH else ""


def _set_setting(server: ComfyServer, key: str, value) -> None:
    import urllib.request

    request = urllib.request.Request(f"{server.url}/settings/{key}", data=json.dumps(value).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(request, timeout=30).close()


def _open(browser, server: ComfyServer, vue_nodes: bool):
    _set_setting(server, "Comfy.VueNodes.Enabled", vue_nodes)
    _set_setting(server, "Comfy.TutorialCompleted", True)
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(f"{e}\n{e.stack or ''}"))
    page.goto(server.url)
    page.wait_for_function("() => window.app?.graph && window.app.vueAppReady !== false", timeout=120_000)
    page.wait_for_timeout(1500)
    page.keyboard.press("Escape")  # dismiss a welcome dialog where there is one
    return page, errors


def _pack_errors(errors: list[str]) -> list[str]:
    """Uncaught errors raised in the pack's own scripts (the frontend's own are not ours)."""
    return [e for e in errors if "/extensions/comfyui-ditfastattn/" in e]


def _missing_types(page, workflow: dict) -> list[str]:
    return page.evaluate(
        """async (wf) => {
            await window.app.loadGraphData(wf);
            const registered = window.LiteGraph?.registered_node_types ?? {};
            return window.app.graph.nodes
                .filter((n) => !(n.type in registered))
                .map((n) => n.type);
        }""",
        workflow,
    )


def _browser_graph(server: ComfyServer, mode: str) -> dict:
    """Calibrate -> Save Plan and Load Plan -> Apply -> KSampler, in API format."""
    seed = {"classic": 11, "vue": 12}[mode]
    graph = {
        **tiny_graph(),
        "calibrate": {"class_type": "DiTFastAttn_Calibrate", "inputs": {
            "model": ["model", 0], "positive": ["positive", 0], "negative": ["negative", 0],
            "latent_image": ["latent", 0], **SAMPLING, "seed": seed, "delta": 0.3, "mode": "fast"}},
        "save": {"class_type": "DiTFastAttn_SavePlan", "inputs": {"plan": ["calibrate", 0],
                                                                  "name": f"browser {mode}", "overwrite": True}},
        "load": {"class_type": "DiTFastAttn_LoadPlan", "inputs": {"plan_name": f"prepared {mode}.json",
                                                                  "embedded_plan": ""}},
        "apply": {"class_type": "DiTFastAttn_Apply", "inputs": {"model": ["model", 0], "plan": ["load", 0]}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": ["apply", 0], "positive": ["positive", 0], "negative": ["negative", 0],
            "latent_image": ["latent", 0], **SAMPLING, "seed": seed}},
        "keep": {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": "browser"}},
    }
    graph = server.with_defaults({k: {"class_type": v["class_type"], "inputs": dict(v["inputs"])}
                                  for k, v in graph.items()})
    # loadApiJson wants numeric-looking ids
    ids = {name: str(i + 1) for i, name in enumerate(graph)}
    out = {}
    for name, node in graph.items():
        inputs = {k: ([ids[v[0]], v[1]] if isinstance(v, list) else v) for k, v in node["inputs"].items()}
        out[ids[name]] = {"class_type": node["class_type"], "inputs": inputs, "_meta": {"title": name}}
    return out


@pytest.fixture(scope="module")
def prepared_plans(server):
    """Plans for Load Plan to find, written over HTTP before the browser runs its graph."""
    for mode in ("classic", "vue"):
        graph = _browser_graph(server, mode)
        by_title = {n["_meta"]["title"]: k for k, n in graph.items()}
        save = graph[by_title["save"]]
        save["inputs"]["name"] = f"prepared {mode}"
        keep = {by_title[t] for t in ("model", "positive", "negative", "latent", "calibrate", "save")}
        entry = server.run({k: v for k, v in graph.items() if k in keep})
        assert entry["status"]["status_str"] == "success", entry["status"]


def queue_in_page(page, server: ComfyServer, load: str, graph: dict, settle_ms: int = 1500) -> None:
    """Load ``graph`` into the editor with the JavaScript call ``load`` (``loadApiJson`` or
    ``loadGraphData``), queue it as the Run button does, and wait until it ran successfully."""
    before = len(server.get("/history"))
    page.evaluate(f"async (g) => {{ await window.app.{load}(g); }}", graph)
    page.wait_for_timeout(1000)
    page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        history = server.get("/history")
        if len(history) > before and not server.get("/queue")["queue_running"]:
            entry = list(history.values())[-1]
            assert entry["status"]["status_str"] == "success", entry["status"]
            break
        time.sleep(0.5)
    else:
        raise TimeoutError("the browser's prompt did not finish")
    page.wait_for_timeout(settle_ms)


def _run_in_page(page, server: ComfyServer, graph: dict) -> None:
    queue_in_page(page, server, "loadApiJson", graph)


def _arrange(page) -> None:
    """Lay the plan nodes out side by side, large enough to judge, and fit the view."""
    page.evaluate(
        """(types) => {
            const nodes = window.app.graph.nodes;
            let x = 20, y = 20;
            for (const n of nodes) {
                if (types.includes(n.type)) { n.pos = [x, 20]; n.size = [380, Math.max(n.size[1], 460)]; x += 400; }
                else { n.pos = [x + ((y / 20) % 3) * 10, 560 + y]; y += 20; }
            }
            window.app.canvas.ds.scale = 0.8;
            window.app.canvas.ds.offset = [70, 60];
            window.app.graph.setDirtyCanvas(true, true);
        }""",
        list(PLAN_NODES),
    )
    page.wait_for_timeout(1500)


LEGEND_COLOURS: list[tuple[int, int, int]] = []


def _heatmap_coverage(page, shot_name: str) -> list[tuple[str, float]]:
    """For each visible heatmap canvas, the fraction of its on-screen pixels that show a
    strategy colour (what the user sees, other widgets and overlays included)."""
    from PIL import Image

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / shot_name))
    canvases = page.locator(".ditfastattn-heatmap canvas")
    found = []
    for i in range(canvases.count()):
        canvas = canvases.nth(i)
        box = canvas.bounding_box()
        if not box or box["width"] < 10 or box["height"] < 10:
            found.append((f"canvas {i}", 0.0))
            continue
        image = Image.open(io.BytesIO(page.screenshot(clip=box))).convert("RGB")
        pixels = list(image.get_flattened_data() if hasattr(image, 'get_flattened_data') else image.getdata())
        hits = sum(1 for p in pixels if any(sum(abs(a - b) for a, b in zip(p, c, strict=True)) < 40 for c in LEGEND_COLOURS))
        found.append((f"canvas {i}", hits / len(pixels)))
    return found


def _legend_colours(server: ComfyServer) -> list[tuple[int, int, int]]:
    legend = server.get("/ditfastattn/legend")
    return [tuple(int(e["colour"][i:i + 2], 16) for i in (1, 3, 5)) for e in legend]


def _assert_heatmaps_visible(page, server, shot_name):
    LEGEND_COLOURS[:] = _legend_colours(server)
    coverage = _heatmap_coverage(page, shot_name)
    assert len(coverage) == len(PLAN_NODES), f"expected a heatmap on each plan node, found {coverage}"
    for name, fraction in coverage:
        assert fraction > 0.6, f"{name}: only {fraction:.0%} of the heatmap is visible ({shot_name})"


def _assert_hover_names_the_cell(page) -> None:
    """Hovering the top-left cell of a heatmap names step 1, layer 1 and its strategy."""
    heatmap = page.locator(".ditfastattn-heatmap").first
    box = heatmap.locator("canvas").bounding_box()
    page.mouse.move(box["x"] + 2, box["y"] + 2)
    page.wait_for_timeout(300)
    text = heatmap.locator("div").last.inner_text()
    labels = [e["label"] for e in json.loads(page.evaluate("() => fetch('/ditfastattn/legend').then(r => r.text())"))]
    assert text.startswith("step 1, layer 1: ") and any(label in text for label in labels), text


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=[p.name for p in UI_WORKFLOWS])
def test_example_workflow_loads_with_no_missing_nodes(server, browser, path):
    page, errors = _open(browser, server, vue_nodes=False)
    try:
        missing = _missing_types(page, json.loads(path.read_text()))
        assert missing == [], f"{path.name}: missing node types {missing} on ComfyUI {VERSION}"
        assert _pack_errors(errors) == [], errors
    finally:
        page.close()


def test_heatmap_visible_in_classic_mode_and_after_reload(server, browser, prepared_plans):
    page, errors = _open(browser, server, vue_nodes=False)
    try:
        _run_in_page(page, server, _browser_graph(server, "classic"))
        _arrange(page)
        _assert_heatmaps_visible(page, server, f"heatmap-classic-{VERSION}.png")
        _assert_hover_names_the_cell(page)
        page.reload()
        page.wait_for_function("() => window.app?.graph?.nodes?.length > 0", timeout=120_000)
        page.wait_for_timeout(2000)
        _arrange(page)
        _assert_heatmaps_visible(page, server, f"heatmap-classic-reloaded-{VERSION}.png")
        assert _pack_errors(errors) == [], errors
    finally:
        page.close()


def _frontend_version() -> tuple[int, ...]:
    from importlib.metadata import version

    return tuple(int(p) for p in version("comfyui-frontend-package").split(".")[:2])


def test_heatmap_visible_in_nodes_2(server, browser, prepared_plans):
    if _frontend_version() < (1, 30):
        pytest.skip(f"frontend {'.'.join(map(str, _frontend_version()))} (ComfyUI {VERSION}): its Nodes 2.0 "
                    "preview renders no DOM widgets at all (not even core multiline text)")
    page, errors = _open(browser, server, vue_nodes=True)
    try:
        _run_in_page(page, server, _browser_graph(server, "vue"))
        _arrange(page)
        assert page.locator("[data-node-id]").count() > 0, "Nodes 2.0 did not render"
        _assert_heatmaps_visible(page, server, f"heatmap-nodes2-{VERSION}.png")
        _assert_hover_names_the_cell(page)
        assert _pack_errors(errors) == [], errors
    finally:
        page.close()
