"""The 256-token demo models' example workflows ("FastAttn image demo - calibrate", "FastAttn video
demo - calibrate") run offline on a real ComfyUI server: only what the pack ships, calibrate ->
save -> apply, FastAttn and FULL images side by side.

Needs COMFYUI_PATH (a ComfyUI tree whose requirements are installed in this Python)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.comfy_server import ComfyServer

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
pytestmark = pytest.mark.skipif(not COMFYUI_PATH, reason="server tests need COMFYUI_PATH (a ComfyUI tree)")
EXAMPLES = Path(__file__).resolve().parents[2] / "example_workflows"
# name -> (filename prefix, images per SaveImage, image side): the video demo saves every frame
DEMOS = {"FastAttn image demo - calibrate": ("ditfastattn_image_demo", 4, 128),
         "FastAttn video demo - calibrate": ("ditfastattn_video_demo", 2 * 4, 64)}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = ComfyServer(Path(COMFYUI_PATH), tmp_path_factory.mktemp("comfy_server")).start()
    yield s
    s.stop()


def _images(server: ComfyServer, prompt: dict, entry: dict, prefix: str) -> list[np.ndarray]:
    (node,) = [k for k, n in prompt.items() if n["class_type"] == "SaveImage"
               and n["inputs"]["filename_prefix"] == prefix]
    return [np.asarray(Image.open(server.output_dir / i["subfolder"] / i["filename"]))
            for i in entry["outputs"][node]["images"]]


@pytest.mark.parametrize("name", list(DEMOS))
def test_scene_demo_workflow_runs_offline_and_compresses(server, name):
    prefix, count, side = DEMOS[name]
    prompt = json.loads((EXAMPLES / "api" / f"{name}.json").read_text())
    loaders = [n for n in prompt.values() if n["class_type"] in ("UNETLoader", "CLIPLoader", "VAELoader")]
    assert [n["class_type"] for n in loaders] == ["UNETLoader"]
    entry = server.run(prompt, timeout=600)
    assert entry["status"]["status_str"] == "success", entry["status"]
    plan = json.loads((server.plans_dir / f"{prefix}.json").read_text())
    assert any(ch != "F" for row in plan["strategies"] for ch in row), "the plan compresses something"
    fast = _images(server, prompt, entry, f"{prefix}_fastattn")
    full = _images(server, prompt, entry, f"{prefix}_full")
    assert len(fast) == len(full) == count and full[0].shape == (side, side, 3)
    assert all(f.std() > 10 for f in full), "the demo model drew nothing"
    assert max(np.abs(a.astype(int) - b.astype(int)).mean() for a, b in zip(fast, full, strict=True)) > 0
