"""Integration tests run against a real ComfyUI tree at $COMFYUI_PATH, on the CPU."""

import os
import sys

import pytest

COMFYUI_PATH = os.environ["COMFYUI_PATH"]
if COMFYUI_PATH not in sys.path:
    sys.path.insert(0, COMFYUI_PATH)

from comfy.cli_args import args  # noqa: E402

args.cpu = True


@pytest.fixture(scope="session")
def comfy_nodes():
    import nodes

    return nodes


@pytest.fixture(scope="session")
def pack(tmp_path_factory, comfy_nodes):
    """The pack loaded by ComfyUI's own custom-node loader: its node classes by id."""
    import asyncio
    import os
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    link = tmp_path_factory.mktemp("custom_nodes") / "comfyui-ditfastattn"
    os.symlink(root, link)
    assert asyncio.run(comfy_nodes.load_custom_node(str(link))), "ComfyUI refused to load the pack"
    return {k: v for k, v in comfy_nodes.NODE_CLASS_MAPPINGS.items() if k.startswith("DiTFastAttn_")}
