"""bench/end_to_end.py, the main job, run as a user runs it (a small setting) from a pack installed
in <ComfyUI>/custom_nodes with no COMFYUI_PATH: it finds that ComfyUI, goes calibrate -> save ->
load -> apply -> generate on the demo model and writes one PNG whose panels, heatmap and figures
say what happened."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.append(str(ROOT / "bench"))  # last: nothing there may shadow ComfyUI's modules

import end_to_end  # noqa: E402

from ditfastattn_core.strategies import legend  # noqa: E402

CLASSES, SAMPLES, STEPS, LAYERS = 3, 2, 4, 2


def _install(tmp: Path) -> Path:
    """A ComfyUI tree (the test's, linked entry by entry) with the pack in its custom_nodes."""
    home = tmp / "ComfyUI"
    (home / "custom_nodes").mkdir(parents=True)
    for entry in Path(os.environ["COMFYUI_PATH"]).iterdir():
        if entry.name != "custom_nodes":
            (home / entry.name).symlink_to(entry)
    (home / "custom_nodes" / "comfyui-ditfastattn").symlink_to(ROOT)
    return home


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("main_job")
    home = _install(tmp)
    out = tmp / "main_job.png"
    env = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_PATH", "PYTHONPATH")}
    run = subprocess.run(
        [sys.executable, str(home / "custom_nodes" / "comfyui-ditfastattn" / "bench" / "end_to_end.py"),
         "--classes", str(CLASSES), "--samples", str(SAMPLES), "--steps", str(STEPS), "--delta", "0.3",
         "--repeats", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=900, cwd=tmp, env=env,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert f"ComfyUI at {home}\n" in run.stdout, run.stdout[:500]
    return out, run.stdout


def _summary(stdout: str, key: str) -> str:
    (line,) = [line.strip() for line in stdout.split("\nsummary\n")[1].splitlines() if line.strip().startswith(key)]
    return line


def test_summary_names_every_figure(job):
    _, stdout = job
    assert re.fullmatch(r"attention FLOPs \d+\.\d% of FULL .*", _summary(stdout, "attention FLOPs"))
    assert re.fullmatch(r"error vs FULL .*: \d\.\d{3}", _summary(stdout, "error vs FULL"))
    assert re.fullmatch(r"speedup over FULL: \d+\.\d\dx .*", _summary(stdout, "speedup over FULL"))
    n = CLASSES * SAMPLES
    assert re.fullmatch(rf"read as their (digit|class) .*: FULL \d+/{n}, FastAttn \d+/{n}", _summary(stdout, "read as"))


def test_png_has_the_layout_the_panels_and_the_plan(job):
    path, stdout = job
    letters = _summary(stdout, "plan:").split()[1:]
    assert len(letters) == STEPS and all(len(row) == LAYERS for row in letters)
    assert any(ch != "F" for row in letters for ch in row), "the plan compresses nothing: nothing to show"
    layout = end_to_end.Layout(CLASSES, SAMPLES, STEPS, LAYERS)
    image = Image.open(path).convert("RGB")
    assert image.size == layout.size
    pixels = np.asarray(image).astype(int)

    def panel(which: int) -> np.ndarray:
        x0, y0, x1, y1 = layout.panel_box(which)
        return pixels[y0:y1, x0:x1, 0]

    full, fast = panel(0), panel(1)
    assert full.std() > 30 and fast.std() > 30, "a panel is blank"
    assert np.abs(full - fast).mean() > 0.5, "FastAttn drew what FULL drew: the plan was not applied"
    colours = {e["letter"]: tuple(int(e["colour"][i:i + 2], 16) for i in (1, 3, 5)) for e in legend()}
    x0, y0, _, _ = layout.heatmap_box()
    for step, row in enumerate(letters):
        for layer, letter in enumerate(row):
            centre = pixels[y0 + layer * end_to_end.HEAT + end_to_end.HEAT // 2,
                            x0 + step * end_to_end.HEAT + end_to_end.HEAT // 2]
            assert tuple(centre) == colours[letter], (step, layer, letter)
