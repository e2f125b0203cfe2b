"""What the Comfy Registry and ComfyUI-Manager read from pyproject.toml, and the publish workflow."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_registry_fields():
    project, comfy = PROJECT["project"], PROJECT["tool"]["comfy"]
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]{0,98}", project["name"])
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["license"] == {"file": "LICENSE"} and (ROOT / "LICENSE").is_file()
    assert project["urls"]["Repository"].startswith("https://github.com/")
    assert comfy["PublisherId"] and comfy["DisplayName"]
    # CI's oldest tree is the floor (.ci/run tests 0.3.64 and 0.29.0)
    assert comfy["requires-comfyui"] == ">=0.3.64"
    assert all((ROOT / path).is_dir() for path in comfy["includes"])


def test_icon_is_the_repositorys_square_svg():
    icon = PROJECT["tool"]["comfy"]["Icon"]
    repo = PROJECT["project"]["urls"]["Repository"].removeprefix("https://github.com/")
    assert icon == f"https://raw.githubusercontent.com/{repo}/main/assets/icon.svg"
    svg = ET.parse(ROOT / "assets" / "icon.svg").getroot()
    assert svg.get("width") == svg.get("height") and svg.get("viewBox") == f"0 0 {svg.get('width')} {svg.get('height')}"


def test_publish_workflow_uses_the_registry_action_with_a_secret():
    text = (ROOT / ".github" / "workflows" / "publish.yml").read_text()
    assert "uses: Comfy-Org/publish-node-action@v1" in text
    assert "personal_access_token: ${{ secrets.REGISTRY_ACCESS_TOKEN }}" in text
    assert 'paths: ["pyproject.toml"]' in text
