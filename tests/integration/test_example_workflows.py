"""The shipped example workflows only use nodes that exist, with consistent links and widgets,
and each has an API-format twin in example_workflows/api/ that says the same thing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / "example_workflows").glob("*.json"))
API = ROOT / "example_workflows" / "api"
FAMILIES = ("PixArt-Sigma", "Flux.2 dev", "SD3.5 Large", "Qwen-Image", "Wan 2.2 experts", "HunyuanVideo 1.5",
            "FastAttn demo")
"""The template browser shows a template's file name as its title: "<model> - calibrate" (calibrate,
then apply the plan in the same graph) and "<model> - saved plan(s)" (apply a saved plan)."""
DEMO = "FastAttn demo"


@pytest.fixture(scope="module")
def node_classes(pack, comfy_nodes):
    """The pack's and ComfyUI's nodes.py nodes. comfy_extras (some loaders and latents) are not
    loaded in this process: tests/server checks every type against a running server."""
    return comfy_nodes.NODE_CLASS_MAPPINGS


def _widget_count(cls) -> int:
    """Widgets of a node as the frontend stores them: one value per widget input, plus the
    'control after generate' value of seed inputs."""
    inputs = cls.INPUT_TYPES()
    count = 0
    for section in ("required", "optional"):
        for spec in inputs.get(section, {}).values():
            kind = spec[0]
            if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                count += 1
                opts = spec[1] if len(spec) > 1 else {}
                if opts.get("control_after_generate"):
                    count += 1
    return count


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_workflow_is_consistent(path, node_classes):
    wf = json.loads(path.read_text())
    by_id = {n["id"]: n for n in wf["nodes"]}
    for n in wf["nodes"]:
        if n["type"].startswith("DiTFastAttn_"):
            assert n["type"] in node_classes, f"unknown node type {n['type']}"
    for lid, a, a_slot, b, b_slot, kind in wf["links"]:
        assert by_id[a]["outputs"][a_slot]["type"] == kind
        assert lid in by_id[a]["outputs"][a_slot]["links"]
        assert by_id[b]["inputs"][b_slot]["link"] == lid
    for n in wf["nodes"]:
        if n["type"].startswith("DiTFastAttn_"):
            assert len(n["widgets_values"]) == _widget_count(node_classes[n["type"]]), n["type"]


def test_every_family_has_its_examples():
    names = {p.stem for p in WORKFLOWS}
    for family in FAMILIES:
        assert any(n.startswith(f"{family} - saved plan") for n in names), family
        assert f"{family} - calibrate" in names


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_template_browser_card(path):
    """The template browser titles a template by its file name and loads <name>.jpg beside it:
    a readable, short, portable name, and its thumbnail (a missing one is a 404 in the console)."""
    from PIL import Image

    # the card shows about 34 characters of a title before it cuts it off
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9 .+-]{0,33}", path.stem) and "_" not in path.stem, path.stem
    with Image.open(path.with_suffix(".jpg")) as thumb:
        assert thumb.format == "JPEG" and thumb.size == (512, 384)
    assert path.with_suffix(".jpg").stat().st_size < 60_000


def test_demo_workflows_need_nothing_but_the_pack(pack):
    """The demo workflows name only the pack's demo model and its shipped plan, so they run
    offline on a fresh ComfyUI (tests/server runs them)."""
    import folder_paths

    from demo_model import DIT_FILE

    demos = [p for p in WORKFLOWS if p.stem.startswith(DEMO)]
    assert len(demos) == 2
    for path in demos:
        api = json.loads((API / path.name).read_text())
        kinds = {n["class_type"] for n in api.values()}
        assert {"DiTFastAttn_DemoClassConditioning", "DiTFastAttn_DemoLatentToImage", "DiTFastAttn_Apply"} <= kinds
        for node in api.values():
            if node["class_type"] == "UNETLoader":
                assert node["inputs"]["unet_name"] == DIT_FILE.name
                assert folder_paths.get_full_path("diffusion_models", DIT_FILE.name) == str(DIT_FILE)
            if node["class_type"] == "DiTFastAttn_LoadPlan":
                assert (ROOT / "plans" / node["inputs"]["plan_name"]).is_file()
            assert node["class_type"] not in ("CLIPLoader", "VAELoader", "CheckpointLoaderSimple")


def _widget_inputs(cls) -> list[str]:
    inputs = cls.INPUT_TYPES()
    names = []
    for section in ("required", "optional"):
        for name, spec in inputs.get(section, {}).items():
            if isinstance(spec[0], list) or spec[0] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                names.append(name)
    return names


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_api_twin_matches_the_workflow(path, node_classes):
    ui = json.loads(path.read_text())
    api = json.loads((API / path.name).read_text())
    assert set(api) == {str(n["id"]) for n in ui["nodes"]}
    links = {lid: (a, a_slot) for lid, a, a_slot, _b, _b_slot, _kind in ui["links"]}
    for n in ui["nodes"]:
        twin = api[str(n["id"])]
        assert twin["class_type"] == n["type"]
        if n["type"] not in node_classes:
            continue  # a comfy_extras node: tests/server validates the twin on a real server
        for socket in n["inputs"]:
            a, a_slot = links[socket["link"]]
            assert twin["inputs"][socket["name"]] == [str(a), a_slot]
        values = [v for v in n["widgets_values"] if v not in ("fixed", "randomize", "increment", "decrement")]
        widgets = [w for w in _widget_inputs(node_classes[n["type"]]) if w not in twin["inputs"]
                   or not isinstance(twin["inputs"][w], list)]
        assert [twin["inputs"][w] for w in widgets] == values, n["type"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_apply_gets_the_latent_it_will_sample(path):
    """Apply FastAttn states the cache memory for its latent input's size and batch: every Apply
    in the examples takes the latent its sampler starts from (in the workflow and its twin)."""
    wf = json.loads(path.read_text())
    api = json.loads((API / path.name).read_text())
    by_id = {n["id"]: n for n in wf["nodes"]}
    applies = [n for n in wf["nodes"] if n["type"] == "DiTFastAttn_Apply"]
    assert applies
    for n in applies:
        (latent,) = [i for i in n["inputs"] if i["name"] == "latent"]
        source = next(link for link in wf["links"] if link[0] == latent["link"])
        assert by_id[source[1]]["outputs"][source[2]]["type"] == "LATENT"
        assert api[str(n["id"])]["inputs"]["latent"] == [str(source[1]), source[2]]
