"""The pack through a real ComfyUI server's HTTP API (POST /prompt): calibrate, save, load
(file and embedded), apply and sample; the bad inputs a client can send; a 30-prompt soak.

Needs COMFYUI_PATH (a ComfyUI tree whose requirements are installed in this Python)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.comfy_server import SAMPLING, ComfyServer, tiny_graph

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
pytestmark = pytest.mark.skipif(not COMFYUI_PATH, reason="server tests need COMFYUI_PATH (a ComfyUI tree)")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
SOAK_PROMPTS = 30
SOAK_WARMUP = 5
SOAK_RSS_LIMIT = 64 * 2**20
PLAN_NAME = "server plan"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = ComfyServer(Path(COMFYUI_PATH), tmp_path_factory.mktemp("comfy_server")).start()
    yield s
    s.stop()


def _prompt(server: ComfyServer, nodes: dict) -> dict:
    """Name-keyed nodes -> an API prompt (links written as [name, slot])."""
    return server.with_defaults({k: {"class_type": v["class_type"], "inputs": dict(v["inputs"])} for k, v in nodes.items()})


def _save_latent(source: str, prefix: str) -> dict:
    return {"class_type": "SaveLatent", "inputs": {"samples": [source, 0 if source != "calibrate" else 1],
                                                     "filename_prefix": f"fastattn_tests/{prefix}"}}


def _latent(server: ComfyServer, entry: dict, node: str) -> torch.Tensor:
    import safetensors.torch

    saved = entry["outputs"][node]["latents"][0]
    path = server.output_dir / saved["subfolder"] / saved["filename"]
    return safetensors.torch.load_file(path)["latent_tensor"]


def _sampled(model: str, seed: int = 0) -> dict:
    return {"class_type": "KSampler", "inputs": {"model": [model, 0], "positive": ["positive", 0],
                                                 "negative": ["negative", 0], "latent_image": ["latent", 0],
                                                 **SAMPLING, "seed": seed}}


def _apply(plan_node: str) -> dict:
    return {"class_type": "DiTFastAttn_Apply", "inputs": {"model": ["model", 0], "plan": [plan_node, 0]}}


def _load(name: str, embedded: str = "") -> dict:
    return {"class_type": "DiTFastAttn_LoadPlan", "inputs": {"plan_name": name, "embedded_plan": embedded}}


@pytest.fixture(scope="module")
def calibrated(server):
    """Calibrate -> Save Plan over HTTP; the calibration's latent and the saved plan's text."""
    graph = {
        **tiny_graph(),
        "calibrate": {"class_type": "DiTFastAttn_Calibrate", "inputs": {
            "model": ["model", 0], "positive": ["positive", 0], "negative": ["negative", 0],
            "latent_image": ["latent", 0], **SAMPLING, "delta": 0.3, "mode": "fast"}},
        "save": {"class_type": "DiTFastAttn_SavePlan", "inputs": {"plan": ["calibrate", 0], "name": PLAN_NAME,
                                                                  "overwrite": True}},
        "keep": _save_latent("calibrate", "calibrated"),
    }
    entry = server.run(_prompt(server, graph))
    assert entry["status"]["status_str"] == "success", entry["status"]
    path = server.plans_dir / f"{PLAN_NAME}.json"
    ui = entry["outputs"]["save"]["ditfastattn_plan"][0]
    return _latent(server, entry, "keep"), path, ui


def test_calibrate_and_save_over_http(server, calibrated):
    latent, path, ui = calibrated
    assert path.is_file() and stat.S_IMODE(path.stat().st_mode) == 0o644
    plan = json.loads(path.read_text())
    assert plan["strategies"] == ui["strategies"]
    assert any(ch != "F" for row in plan["strategies"] for ch in row), "the plan compresses something"
    assert [e["letter"] for e in ui["legend"]] == ["F", "W", "C", "X", "T", "A", "S"]
    assert latent.shape == (1, 16, 16, 24) and torch.isfinite(latent).all()


@pytest.mark.parametrize("source", ["file", "embedded"])
def test_loaded_plan_reproduces_the_calibration(server, calibrated, source):
    latent, path, _ = calibrated
    load = _load(path.name) if source == "file" else _load("(none)", path.read_text())
    graph = {**tiny_graph(), "load": load, "apply": _apply("load"), "sample": _sampled("apply"),
             "plain": _sampled("model"), "keep": _save_latent("sample", f"applied_{source}"),
             "keep_plain": _save_latent("plain", f"plain_{source}")}
    entry = server.run(_prompt(server, graph))
    assert entry["status"]["status_str"] == "success", entry["status"]
    applied = _latent(server, entry, "keep")
    assert torch.equal(applied, latent), f"max abs difference {(applied - latent).abs().max():.3g}"
    plain = _latent(server, entry, "keep_plain")
    assert not torch.equal(plain, latent), "the applied plan changed nothing: compression is not running"
    assert entry["outputs"]["apply"]["ditfastattn_plan"][0]["strategies"] == json.loads(path.read_text())["strategies"]


@pytest.mark.parametrize("name", ["../evil", "evil\n", "CON", "a/b"])
def test_bad_save_name_is_refused_once_on_its_widget(server, calibrated, name):
    _, path, _ = calibrated
    graph = {"load": _load(path.name),
             "save": {"class_type": "DiTFastAttn_SavePlan", "inputs": {"plan": ["load", 0], "name": name}}}
    status, answer = server.post_prompt(_prompt(server, graph))
    assert status == 400
    errors = answer["node_errors"]["save"]["errors"]
    assert len(errors) == 1 and errors[0]["extra_info"]["input_name"] == "name", errors
    assert not (server.plans_dir.parent / "evil.json").exists()


def test_unknown_plan_name_is_refused_before_the_run_without_server_paths(server):
    graph = {"load": _load("nobody's plan.json"),
             "save": {"class_type": "DiTFastAttn_SavePlan", "inputs": {"plan": ["load", 0], "name": "x"}}}
    status, answer = server.post_prompt(_prompt(server, graph))
    assert status == 400
    text = json.dumps(answer)
    assert "no plan named" in text
    assert str(server.home) not in text and "/tmp" not in text


def test_bad_embedded_plan_fails_with_a_clear_node_error(server):
    graph = {"load": _load("(none)", json.dumps({"format": "pickle"})),
             "save": {"class_type": "DiTFastAttn_SavePlan", "inputs": {"plan": ["load", 0], "name": "never"}}}
    entry = server.run(_prompt(server, graph))
    assert entry["status"]["status_str"] == "error"
    failure = [m for kind, m in entry["status"]["messages"] if kind == "execution_error"][0]
    assert failure["node_type"] == "DiTFastAttn_LoadPlan" and "not a FastAttn plan" in failure["exception_message"]
    assert not (server.plans_dir / "never.json").exists()


def test_plan_for_another_model_is_refused(server, calibrated):
    _, path, _ = calibrated
    plan = json.loads(path.read_text())
    plan["model"]["layers"] = plan["model"]["layers"] + 3
    plan["strategies"] = [row + "F" * 3 for row in plan["strategies"]]
    graph = {**tiny_graph(), "load": _load("(none)", json.dumps(plan)), "apply": _apply("load"),
             "sample": _sampled("apply"), "keep": _save_latent("sample", "mismatch")}
    entry = server.run(_prompt(server, graph))
    assert entry["status"]["status_str"] == "error"
    failure = [m for kind, m in entry["status"]["messages"] if kind == "execution_error"][0]
    assert "layers" in failure["exception_message"]


EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "example_workflows").glob("*.json"))
# The demo workflows (digits, image, video) name only what the pack ships (its demo models and plan): they run here.
OFFLINE = [p for p in EXAMPLES if p.stem.startswith("FastAttn ") and " demo" in p.stem]
NEEDS_MODELS = [p for p in EXAMPLES if p not in OFFLINE]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_workflow_uses_only_node_types_this_comfyui_has(server, path):
    known = server.get("/object_info")
    ui = json.loads(path.read_text())
    assert sorted({n["type"] for n in ui["nodes"]} - set(known)) == []


WIDGET_KINDS = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def _widget_inputs(info: dict) -> list[tuple[str, bool]]:
    """A node's widget inputs by /object_info, in order, each with whether the frontend adds a
    'control after generate' value after it (seeds)."""
    out = []
    for section in ("required", "optional"):
        for name, spec in (info["input"].get(section) or {}).items():
            kind, opts = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
            if isinstance(kind, list) or kind in WIDGET_KINDS:
                control = bool(opts.get("control_after_generate")) or (kind == "INT" and name in ("seed", "noise_seed"))
                out.append((name, control))
    return out


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_widgets_match_this_comfyuis_node_definitions(server, path):
    """Against the running server's /object_info (every node, core ones included): each saved
    node holds one value per widget input (plus seeds' control value), and each API twin sets
    only inputs the node has, every required widget among them."""
    known = server.get("/object_info")
    ui = json.loads(path.read_text())
    for node in ui["nodes"]:
        widgets = _widget_inputs(known[node["type"]])
        values = node.get("widgets_values")
        if isinstance(values, list):
            assert len(values) == len(widgets) + sum(c for _, c in widgets), (node["type"], values, widgets)
    api = json.loads((path.parent / "api" / path.name).read_text())
    for node in api.values():
        info = known[node["class_type"]]
        names = {**(info["input"].get("required") or {}), **(info["input"].get("optional") or {})}
        assert set(node["inputs"]) <= set(names), (node["class_type"], set(node["inputs"]) - set(names))
        required = {n for n, _ in _widget_inputs({"input": {"required": info["input"].get("required") or {}}})}
        assert required <= set(node["inputs"]), (node["class_type"], required - set(node["inputs"]))


@pytest.mark.parametrize("path", NEEDS_MODELS, ids=[p.name for p in NEEDS_MODELS])
def test_example_api_twin_is_valid_here_but_for_model_files(server, path):
    """The API twin passes validation except for the model files (and model-type options) this
    test server does not have."""
    status, answer = server.post_prompt(json.loads((path.parent / "api" / path.name).read_text()))
    assert status == 400, "the twin names models this server does not have"
    for node in answer["node_errors"].values():
        for e in node["errors"]:
            if e["type"] == "custom_validation_failed":  # Load Plan: the plan file is not here
                assert node["class_type"] == "DiTFastAttn_LoadPlan" and "no plan named" in e["details"], e
                continue
            assert e["type"] == "value_not_in_list", e
            assert e["extra_info"]["input_name"] in {"unet_name", "clip_name", "clip_name1", "clip_name2", "vae_name",
                                                     "ckpt_name", "type", "plan_name"}, e


def _run_example(server: ComfyServer, name: str) -> tuple[dict, dict]:
    prompt = json.loads((EXAMPLES[0].parent / "api" / f"{name}.json").read_text())
    entry = server.run(prompt, timeout=600)
    assert entry["status"]["status_str"] == "success", entry["status"]
    return prompt, entry


def _images(server: ComfyServer, prompt: dict, entry: dict, prefix: str) -> list[np.ndarray]:
    """The images the workflow's SaveImage with this filename prefix wrote, as arrays."""
    (node,) = [k for k, n in prompt.items() if n["class_type"] == "SaveImage"
               and n["inputs"]["filename_prefix"] == prefix]
    return [np.asarray(Image.open(server.output_dir / i["subfolder"] / i["filename"]))
            for i in entry["outputs"][node]["images"]]


def _applied_strategies(prompt: dict, entry: dict) -> list[str]:
    (node,) = [k for k, n in prompt.items() if n["class_type"] == "DiTFastAttn_Apply"]
    return entry["outputs"][node]["ditfastattn_plan"][0]["strategies"]


def _compressed_and_full(server: ComfyServer, prompt: dict, entry: dict) -> None:
    """The FastAttn and FULL images exist, one per latent, and the plan changed them."""
    fast = _images(server, prompt, entry, "ditfastattn_demo_fastattn")
    full = _images(server, prompt, entry, "ditfastattn_demo_full")
    assert len(fast) == len(full) == 4 and fast[0].shape == (64, 64, 3)
    assert all(f.std() > 10 for f in full), "the demo model drew nothing"
    differences = [np.abs(a.astype(int) - b.astype(int)).mean() for a, b in zip(fast, full, strict=True)]
    assert min(differences) > 0, f"the plan changed nothing: compression is not running ({differences})"


def test_demo_example_workflows_run_offline(server):
    """Apply a saved plan (the pack's shipped one), then calibrate -> save, then apply the saved
    plan again: it now reads the plan just saved, which takes precedence over the shipped one."""
    shipped = json.loads((EXAMPLES[0].parents[1] / "plans" / "ditfastattn_demo.json").read_text())
    saved = server.plans_dir / "ditfastattn_demo.json"
    saved.unlink(missing_ok=True)

    prompt, entry = _run_example(server, "FastAttn demo - saved plan")
    assert _applied_strategies(prompt, entry) == shipped["strategies"]
    _compressed_and_full(server, prompt, entry)

    prompt, entry = _run_example(server, "FastAttn demo - calibrate")
    assert saved.is_file() and stat.S_IMODE(saved.stat().st_mode) == 0o644
    plan = json.loads(saved.read_text())
    assert plan["model"] == {"family": "sd3", "layers": 2} and plan["sampling"]["steps"] == 20
    assert _applied_strategies(prompt, entry) == plan["strategies"]
    assert any(ch != "F" for row in plan["strategies"] for ch in row), "the plan compresses something"
    assert len(_images(server, prompt, entry, "ditfastattn_demo_calibration")) == 4
    _compressed_and_full(server, prompt, entry)

    plan["strategies"] = ["F" * len(row) for row in plan["strategies"][:-1]] + plan["strategies"][-1:]
    saved.write_text(json.dumps(plan))  # a plan the shipped one cannot be mistaken for
    prompt, entry = _run_example(server, "FastAttn demo - saved plan")
    assert _applied_strategies(prompt, entry) == plan["strategies"]
    saved.unlink()


def test_soak_memory_stays_flat(server, calibrated):
    """30 prompts (apply + sample, a new seed each, so nothing is served from the cache)."""
    _, path, _ = calibrated
    rss = []
    for i in range(SOAK_PROMPTS):
        graph = {**tiny_graph(), "load": _load(path.name), "apply": _apply("load"), "sample": _sampled("apply", i),
                 "keep": _save_latent("sample", "soak")}
        entry = server.run(_prompt(server, graph))
        assert entry["status"]["status_str"] == "success", entry["status"]
        rss.append(server.rss_bytes())
    growth = rss[-1] - rss[SOAK_WARMUP - 1]
    report = (f"ComfyUI {Path(COMFYUI_PATH).name}: server RSS after prompt {SOAK_WARMUP} "
              f"{rss[SOAK_WARMUP - 1] / 2**20:.1f} MiB, after prompt {SOAK_PROMPTS} {rss[-1] / 2**20:.1f} MiB, "
              f"growth {growth / 2**20:+.1f} MiB over {SOAK_PROMPTS - SOAK_WARMUP} prompts")
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / f"server-soak-{Path(COMFYUI_PATH).name}.txt").write_text(report + "\n")
    print(report)
    assert growth < SOAK_RSS_LIMIT, report
