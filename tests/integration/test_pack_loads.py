import asyncio
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_pack_loads_as_a_custom_node(tmp_path, comfy_nodes):
    """ComfyUI imports the repo as a custom node package and registers its web folder."""
    custom = tmp_path / "custom_nodes"
    custom.mkdir()
    link = custom / "comfyui-ditfastattn"
    os.symlink(ROOT, link)
    ok = asyncio.run(comfy_nodes.load_custom_node(str(link)))
    assert ok, "ComfyUI refused to load the pack (see the log above)"
    web = Path(comfy_nodes.EXTENSION_WEB_DIRS["comfyui-ditfastattn"])
    assert web.resolve() == (ROOT / "web").resolve()
