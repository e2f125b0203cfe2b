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


def _kitchen_runs() -> bool:
    try:
        return KERNELS["kitchen"].available()
    except Exception:
        return False


def test_the_gpu_check_runs_every_kernel_it_would_time(kernels_bench, monkeypatch):
    # on CPU blocked runs every preset, with and without text; comfy-kitchen (where installed)
    # the border-shifted ones without text. A wrong one stops it.
    gpu = importlib.import_module("gpu")
    lines = []
    kitchen = sum(spec.shifted for spec in PRESETS.values()) if _kitchen_runs() else 0
    assert gpu.check_all("cpu", torch.float32, heads=1, head_dim=8, print_line=lines.append) == 2 * len(PRESETS) + kitchen
    assert sum(" kitchen " in line for line in lines) == kitchen
    wrong = KERNELS["blocked"].__class__("blocked", lambda q, k, v, window, scale: q, lambda: True,
                                         KERNELS["blocked"].unsupported)
    monkeypatch.setitem(KERNELS, "blocked", wrong)
    with pytest.raises(kernels_bench.KernelMismatch, match="blocked"):
        gpu.check_all("cpu", torch.float32, heads=1, head_dim=8, print_line=lines.append)


@pytest.fixture
def stand_in_kitchen(monkeypatch):
    """An installed comfy-kitchen, exact (the reference), in every venv."""
    from ditfastattn_core.kernels.kitchen import kitchen_unsupported

    monkeypatch.setitem(KERNELS, "kitchen", KERNELS["kitchen"].__class__(
        "kitchen", KERNELS["reference"].fn, lambda: True, kitchen_unsupported))


def test_the_kitchen_kernel_is_timed_and_checked_on_its_windows_only(kernels_bench, stand_in_kitchen):
    spec = PRESETS["2D neighbourhood 1/8 (comfy-kitchen na2d)"]
    q = torch.zeros(1, 1, 1, 8)
    assert [n for n, _ in kernels_bench.kernels_for(spec.bind(kernels_bench.layout_for(spec, 256)), q)] == [
        "blocked", "kitchen"]
    assert [n for n, _ in kernels_bench.kernels_for(spec.bind(kernels_bench.layout_for(spec, 256, text=5)), q)] == [
        "blocked"]
    box = PRESETS["2D box 1/8"]
    assert [n for n, _ in kernels_bench.kernels_for(box.bind(kernels_bench.layout_for(box, 256)), q)] == ["blocked"]
    gpu = importlib.import_module("gpu")
    lines = []
    shifted = sum(s.shifted for s in PRESETS.values())
    assert gpu.check_all("cpu", torch.float32, heads=1, head_dim=8, print_line=lines.append) == 2 * len(PRESETS) + shifted


def test_a_broken_kitchen_is_left_out_of_the_bench_not_a_crash(kernels_bench, monkeypatch):
    from ditfastattn_core.kernels.kitchen import kitchen_unsupported

    def unloadable():
        raise OSError("_C.so: undefined symbol")

    monkeypatch.setitem(KERNELS, "kitchen", KERNELS["kitchen"].__class__(
        "kitchen", KERNELS["reference"].fn, unloadable, kitchen_unsupported))
    spec = PRESETS["3D neighbourhood 1/4 x 1/8 x 1/8 (comfy-kitchen na3d)"]
    w = spec.bind(kernels_bench.layout_for(spec, 1024))
    assert [n for n, _ in kernels_bench.kernels_for(w, torch.zeros(1, 1, 1, 8))] == ["blocked"]


def test_the_bench_also_times_eager_flex_and_the_reference_when_asked(kernels_bench):
    spec = PRESETS["2D box 1/8"]
    w = spec.bind(kernels_bench.layout_for(spec, 256))
    names = [n for n, _ in kernels_bench.kernels_for(w, torch.zeros(1, 1, 1, 8), also=kernels_bench.ALSO)]
    assert names == ["blocked", *(["flex-unfused"] if KERNELS["flex"].available() else []), "reference"]
    rows = kernels_bench.bench_case("image", w.layout, [("2D box 1/8", spec)], repeats=1, dtype=torch.float32,
                                    device="cpu", heads=1, head_dim=8, check_tol=2e-4, print_row=lambda line: None,
                                    also=kernels_bench.ALSO)
    assert [r.kernel for r in rows] == names


def test_auto_choices_name_a_kernel_for_every_preset(kernels_bench, stand_in_kitchen, monkeypatch):
    from ditfastattn_core import kernels

    monkeypatch.setattr(kernels, "_checked", {})
    monkeypatch.setattr(kernels, "_rankings", {})
    monkeypatch.setattr(kernels, "time_kernel", lambda kernel, window, q: {"kitchen": 1.0}.get(kernel.name, 2.0))
    gpu = importlib.import_module("gpu")
    lines = []
    chosen = gpu.auto_choices("cpu", torch.float32, heads=1, head_dim=8, n=256, print_line=lines.append)
    assert chosen == {label: "kitchen" if spec.shifted else "blocked" for label, spec in PRESETS.items()}
    assert sum("measured: kitchen < blocked" in line for line in lines) == 2
