"""The browser tests' real ComfyUI server and headless chromium (one of each per test module)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.browser.test_browser_heatmap import CHROMIUM, CHROMIUM_ARGS, COMFYUI_PATH
from tests.comfy_server import ComfyServer


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = ComfyServer(Path(COMFYUI_PATH), tmp_path_factory.mktemp("browser_server")).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"),
                              args=CHROMIUM_ARGS)
        yield b
        b.close()
