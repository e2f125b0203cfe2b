import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _comfyui_path() -> str | None:
    """$COMFYUI_PATH, else the ComfyUI the pack is installed in (found above the pack, as the
    benchmarks find it): the integration, server and browser tests read it from the environment."""
    if os.environ.get("COMFYUI_PATH"):
        return os.environ["COMFYUI_PATH"]
    sys.path.append(str(ROOT / "bench"))  # last: nothing there may shadow ComfyUI's modules
    from comfy_setup import comfyui_above

    # the pack's path as the shell sees it (a symlinked pack), then its real folder
    found = comfyui_above(*(Path(p) / "conftest.py" for p in (os.environ.get("PWD"),) if p),
                          Path(os.path.abspath(__file__)), ROOT)
    if found is not None:
        os.environ["COMFYUI_PATH"] = str(found)
    return os.environ.get("COMFYUI_PATH")


COMFYUI_PATH = _comfyui_path()
collect_ignore = [] if COMFYUI_PATH else ["integration"]


def pytest_report_header(config):
    if COMFYUI_PATH:
        return f"integration tests: ComfyUI at {COMFYUI_PATH}"
    return "integration tests: skipped (set COMFYUI_PATH to a ComfyUI tree to run them)"
