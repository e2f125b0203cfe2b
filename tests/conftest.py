import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
collect_ignore = [] if COMFYUI_PATH else ["integration"]


def pytest_report_header(config):
    if COMFYUI_PATH:
        return f"integration tests: ComfyUI at {COMFYUI_PATH}"
    return "integration tests: skipped (set COMFYUI_PATH to a ComfyUI tree to run them)"
