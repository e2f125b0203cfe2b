"""A real ComfyUI server for the server and browser tests.

It runs `main.py --cpu` on a free loopback port from a temporary copy of the tree at
$COMFYUI_PATH, with the pack and the test-only nodes of tests/server_nodes in the copy's own
custom_nodes folder and a tiny SD3 model (random weights, written by the test) in its
models/diffusion_models. Nothing here is part of the pack.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = "tiny_sd3.safetensors"
STARTUP_TIMEOUT_S = 240

# The tiny SD3 of tests/integration/tiny.py, saved as a diffusion model that ComfyUI's
# UNETLoader detects from its weights. Written by a child process in the server's tree, so
# the test process never imports ComfyUI.
_WRITE_TINY_MODEL = textwrap.dedent("""
    import sys
    sys.path[:0] = [sys.argv[1], sys.argv[2]]
    from comfy.cli_args import args
    args.cpu = True
    import comfy.utils
    import tiny
    model = tiny.sd3().patcher.model.diffusion_model
    comfy.utils.save_torch_file(model.state_dict(), sys.argv[3])
""")

# What the tiny model takes: tests/server_nodes builds conditioning of this shape.
TINY_CONDITIONING = {"length": 8, "dim": 32, "pooled_dim": 32}
TINY_LATENT = {"width": 192, "height": 128, "batch_size": 1}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """One ComfyUI server process on a private copy of a tree; stop() ends it."""

    def __init__(self, tree: Path, workdir: Path):
        self.tree = Path(tree)
        self.home = Path(workdir) / "ComfyUI"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.log_path = Path(workdir) / "server.log"

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> ComfyServer:
        ignore = shutil.ignore_patterns(".git", "tests", "tests-unit", "__pycache__", "output", "temp", "user")
        shutil.copytree(self.tree, self.home, ignore=ignore, symlinks=True)
        custom = self.home / "custom_nodes"
        custom.mkdir(exist_ok=True)
        os.symlink(ROOT, custom / "comfyui-ditfastattn")
        shutil.copytree(ROOT / "tests" / "server_nodes", custom / "fastattn_test_nodes")
        models = self.home / "models" / "diffusion_models"
        models.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-c", _WRITE_TINY_MODEL, str(self.home), str(ROOT / "tests" / "integration"),
             str(models / TINY_MODEL)],
            check=True, cwd=self.home, timeout=300,
        )
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--disable-auto-launch"],
            cwd=self.home, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited at startup:\n{self.log_tail()}")
            try:
                self.get("/system_stats")
                return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {STARTUP_TIMEOUT_S} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    # -- HTTP --------------------------------------------------------------------------------
    def get(self, route: str):
        with urllib.request.urlopen(self.url + route, timeout=30) as response:
            return json.loads(response.read())

    def free(self) -> None:
        """POST /free: unload models and drop the execution cache (the next prompt runs every node)."""
        request = urllib.request.Request(
            self.url + "/free", data=json.dumps({"unload_models": True, "free_memory": True}).encode(),
            headers={"Content-Type": "application/json"},
        )
        urllib.request.urlopen(request, timeout=60).close()

    def post_prompt(self, prompt: dict) -> tuple[int, dict]:
        """POST /prompt: (HTTP status, JSON answer); validation errors come back as 400."""
        request = urllib.request.Request(
            self.url + "/prompt", data=json.dumps({"prompt": prompt}).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def run(self, prompt: dict, timeout: float = 300) -> dict:
        """Queue ``prompt``, wait for it, and return its history entry (status and outputs)."""
        status, answer = self.post_prompt(prompt)
        if status != 200:
            raise AssertionError(f"prompt refused ({status}): {json.dumps(answer, indent=1)[:3000]}")
        return self.wait(answer["prompt_id"], timeout)

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            time.sleep(0.1)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s:\n{self.log_tail()}")

    def with_defaults(self, prompt: dict) -> dict:
        """Fill every widget input a node has but the prompt leaves out with its default, so
        the graphs below name only what they mean and survive new optional inputs."""
        info = {}
        for node in prompt.values():
            kind = node["class_type"]
            if kind not in info:
                info[kind] = self.get(f"/object_info/{kind}")[kind]["input"]
            for name, spec in info[kind].get("required", {}).items():
                if name not in node["inputs"] and len(spec) > 1 and isinstance(spec[1], dict) and "default" in spec[1]:
                    node["inputs"][name] = spec[1]["default"]
        return prompt

    # -- the process ------------------------------------------------------------------------
    def rss_bytes(self) -> int:
        """Resident memory of the server process (Linux /proc)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS for the server process")

    @property
    def output_dir(self) -> Path:
        return self.home / "output"

    @property
    def plans_dir(self) -> Path:
        return self.home / "models" / "fastattn_plans"


def tiny_graph() -> dict:
    """The nodes every test graph starts with: tiny model, conditioning, empty latent."""
    return {
        "model": {"class_type": "UNETLoader", "inputs": {"unet_name": TINY_MODEL, "weight_dtype": "default"}},
        "positive": {"class_type": "FastAttnTest_TinyConditioning", "inputs": {"seed": 1, **TINY_CONDITIONING}},
        "negative": {"class_type": "FastAttnTest_TinyConditioning", "inputs": {"seed": 2, **TINY_CONDITIONING}},
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": dict(TINY_LATENT)},
    }


SAMPLING = {"seed": 0, "steps": 4, "cfg": 3.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}
