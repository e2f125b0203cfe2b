"""The tests and the benchmarks find the ComfyUI the pack is installed in, as the main job does."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.append(str(ROOT / "bench"))  # last: nothing there may shadow other modules

from comfy_setup import comfyui_above  # noqa: E402


def _tree(root: Path) -> Path:
    (root / "comfy").mkdir(parents=True)
    (root / "nodes.py").write_text("")
    (root / "main.py").write_text("")
    pack = root / "custom_nodes" / "comfyui-ditfastattn" / "tests"
    pack.mkdir(parents=True)
    return pack / "conftest.py"


def test_the_comfyui_above_an_installed_pack_is_found(tmp_path):
    conftest = _tree(tmp_path / "ComfyUI")
    assert comfyui_above(conftest) == tmp_path / "ComfyUI"
    assert comfyui_above(tmp_path / "elsewhere" / "x.py", conftest) == tmp_path / "ComfyUI", "any start may find it"


def test_a_folder_that_only_looks_like_comfyui_is_not(tmp_path):
    conftest = _tree(tmp_path / "ComfyUI")
    (tmp_path / "ComfyUI" / "main.py").unlink()
    assert comfyui_above(conftest) is None
