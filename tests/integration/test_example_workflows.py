"""The shipped example workflows only use nodes that exist, with consistent links and widgets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / "example_workflows").glob("*.json"))


@pytest.fixture(scope="module")
def node_classes(pack, comfy_nodes):
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
        assert n["type"] in node_classes, f"unknown node type {n['type']}"
    for lid, a, a_slot, b, b_slot, kind in wf["links"]:
        assert by_id[a]["outputs"][a_slot]["type"] == kind
        assert lid in by_id[a]["outputs"][a_slot]["links"]
        assert by_id[b]["inputs"][b_slot]["link"] == lid
    for n in wf["nodes"]:
        if n["type"].startswith("DiTFastAttn_"):
            assert len(n["widgets_values"]) == _widget_count(node_classes[n["type"]]), n["type"]


def test_there_is_an_example():
    assert WORKFLOWS
