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


def test_the_frontend_holds_no_copy_of_the_strategy_table():
    """Labels and colours reach the heatmap with the plan (Strategy table -> legend())."""
    from ditfastattn_core.strategies import Strategy

    for path in (ROOT / "web").glob("*.js"):
        source = path.read_text()
        for strategy in Strategy:
            assert strategy.colour not in source, f"{path.name} hard-codes {strategy.name}'s colour"
            assert f'"{strategy.label}"' not in source, f"{path.name} hard-codes {strategy.name}'s label"


def test_the_js_tests_use_the_legend_the_pack_sends():
    import json
    import re

    from ditfastattn_core.strategies import legend

    source = (ROOT / "tests" / "web" / "heatmap.test.mjs").read_text()
    block = re.search(r"const LEGEND = (\[.*?\]);", source, re.S).group(1)
    as_json = re.sub(r"(\w+):", r'"\1":', block).replace(",\n]", "\n]")
    assert json.loads(as_json) == legend()
