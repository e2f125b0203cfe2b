"""Runs the frontend's pure JavaScript under node's test runner (skipped without node)."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_web_heatmap_under_node():
    proc = subprocess.run(
        ["node", "--test", str(ROOT / "tests" / "web")], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_extension_entry_point_parses():
    # The extension imports ComfyUI's app.js, which only exists in the browser: check syntax only.
    proc = subprocess.run(
        ["node", "--input-type=module", "--check"], input=(ROOT / "web" / "ditfastattn.js").read_text(),
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
