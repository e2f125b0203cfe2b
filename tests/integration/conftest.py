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
