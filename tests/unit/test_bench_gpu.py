"""bench/gpu.py: one line and exit 0 without CUDA; its exactness check catches a wrong kernel."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ditfastattn_core.kernels import KERNELS
from ditfastattn_core.window import PRESETS

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def kernels_bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("kernels")


def test_without_cuda_it_prints_one_line_and_exits_0():
    env = {"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, str(BENCH / "gpu.py")], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and "no CUDA" in lines[0], done.stdout


@pytest.mark.parametrize("preset", ["2D box 1/8", "3D box 1/4 x 1/8 x 1/8 (video)", "band 1/8 (paper)"])
def test_the_exactness_check_passes_a_right_kernel_and_catches_a_wrong_one(kernels_bench, preset):
    spec = PRESETS[preset]
    w = spec.bind(kernels_bench.layout_for(spec, 256, text=5))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, w.layout.seq_len, 8, generator=g) for _ in range(3))
    tol = kernels_bench.TOLERANCE[torch.float32]

    def blocked(q, k, v):
        return KERNELS["blocked"](q, k, v, w)

    def one_key_too_many(q, k, v):
        # the window plus a single extra key per image query: close, but not this window
        mask = w.dense_mask()
        start = w.layout.image_start
        mask[start : start + 20, start + w.layout.num_image - 1] = True
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    assert kernels_bench.check_exact("blocked", blocked, w, q, k, v, tol) <= tol
    with pytest.raises(kernels_bench.KernelMismatch, match="one_key_too_many|max abs error"):
        kernels_bench.check_exact("one_key_too_many", one_key_too_many, w, q, k, v, tol)
    with pytest.raises(kernels_bench.KernelMismatch, match="NaN|nan|max abs error"):
        kernels_bench.check_exact("nan", lambda q, k, v: blocked(q, k, v) * float("nan"), w, q, k, v, tol)


def test_the_gpu_check_runs_every_kernel_it_would_time(kernels_bench, monkeypatch):
    # on CPU only blocked can run: every preset gets checked once, and a wrong one stops it
    gpu = importlib.import_module("gpu")
    lines = []
    assert gpu.check_all("cpu", torch.float32, heads=1, head_dim=8, print_line=lines.append) == 2 * len(PRESETS)
    wrong = KERNELS["blocked"].__class__("blocked", lambda q, k, v, window, scale: q, lambda: True,
                                         KERNELS["blocked"].unsupported)
    monkeypatch.setitem(KERNELS, "blocked", wrong)
    with pytest.raises(kernels_bench.KernelMismatch, match="blocked"):
        gpu.check_all("cpu", torch.float32, heads=1, head_dim=8, print_line=lines.append)
