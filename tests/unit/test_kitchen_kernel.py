"""The comfy-kitchen kernel (``na3d``): exact on border-shifted windows, unusable without it.

Tests that run comfy-kitchen itself need 0.2.40 or newer (na2d/na3d) and skip without it (the
ComfyUI 0.29.0 test venv has 0.2.24). The reshaping around na3d, the fallbacks and the
fail-safe are tested everywhere, with an na3d written out here from NATTEN's definition.
"""

import importlib.util
import itertools
import sys

import pytest
import torch

from ditfastattn_core import kernels
from ditfastattn_core.kernels import KERNELS, checked_kernel, select_kernel, usable_kernel
from ditfastattn_core.kernels import kitchen as kitchen_module
from ditfastattn_core.window import PRESETS, TokenLayout, WindowSpec


def _real_na3d():
    if importlib.util.find_spec("comfy_kitchen") is None:
        return None
    import comfy_kitchen

    return getattr(comfy_kitchen, "na3d", None)


needs_na3d = pytest.mark.skipif(
    _real_na3d() is None,
    reason="comfy-kitchen >= 0.2.40 (with na2d/na3d) is not installed here (ComfyUI 0.29.0's venv has 0.2.24)",
)

CASES = {
    "2d-odd": (WindowSpec(dims=2, extent=(0.25, 0.2), border="shift"), (13, 9)),
    "2d-preset-on-a-one-frame-video": (PRESETS["2D neighbourhood 1/8 (comfy-kitchen na2d)"], (1, 19, 37)),
    "2d-kernel-wider-than-an-axis": (WindowSpec(dims=2, extent=(0.5, 0.125), border="shift"), (3, 40)),
    "3d-odd": (WindowSpec(dims=3, extent=(0.3, 0.25, 0.25), border="shift"), (4, 6, 5)),
    "3d-preset": (PRESETS["3D neighbourhood 1/4 x 1/8 x 1/8 (comfy-kitchen na3d)"], (3, 11, 35)),
    "3d-kernels-wider-than-axes": (WindowSpec(dims=3, extent=(1.0, 0.6, 0.25), border="shift"), (3, 5, 7)),
}


def _qkv(seq, dtype=torch.float32, batch=2, heads=3, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, seq, dim, generator=g).to(dtype) for _ in range(3)]


def natten_na3d(q, k, v, kernel_size, is_causal=None, scale=None):
    """NATTEN's non-causal na3d on (B, T, H, W, heads, D), one query at a time: per axis the
    ``kernel_size`` positions centred on the query (at most the axis), shifted inwards."""
    assert not any(is_causal or ())
    b, *grid, h, d = q.shape
    scale = d**-0.5 if scale is None else scale
    out = torch.empty_like(q)
    for pos in itertools.product(*(range(n) for n in grid)):
        box = []
        for i, n, size in zip(pos, grid, kernel_size, strict=True):
            size = min(size, n)
            start = min(max(i - size // 2, 0), n - size)
            box.append(slice(start, start + size))
        keys = k[(slice(None), *box)].reshape(b, -1, h, d)
        values = v[(slice(None), *box)].reshape(b, -1, h, d)
        weights = torch.einsum("bhd,bkhd->bhk", q[(slice(None), *pos)] * scale, keys).softmax(-1)
        out[(slice(None), *pos)] = torch.einsum("bhk,bkhd->bhd", weights, values)
    return out


@pytest.fixture
def fresh(monkeypatch):
    """No kernel checked, disabled or measured yet; comfy_kitchen loaded anew."""
    monkeypatch.setattr(kernels, "DISABLED", {})
    monkeypatch.setattr(kernels, "_checked", {})
    monkeypatch.setattr(kernels, "_rankings", {})
    kernels._warn_fallback.cache_clear()
    load = kitchen_module._load  # the cached loader (a test may replace it)
    load.cache_clear()
    yield kernels
    load.cache_clear()


@pytest.fixture
def written_out_na3d(fresh, monkeypatch):
    """comfy_kitchen's na3d replaced by the one written out above (present in every venv)."""
    calls = []

    def na3d(q, k, v, kernel_size, is_causal=None, scale=None):
        calls.append({"shape": tuple(q.shape), "kernel_size": list(kernel_size), "scale": scale})
        return natten_na3d(q, k, v, kernel_size, is_causal, scale)

    monkeypatch.setattr(kitchen_module, "_load", lambda: (na3d, None))
    return calls


@pytest.mark.parametrize("case", list(CASES))
def test_the_kernel_lays_the_sequence_on_na3ds_grid_and_equals_the_reference(written_out_na3d, case):
    spec, grid = CASES[case]
    w = spec.bind(TokenLayout.image_only(grid))
    q, k, v = _qkv(w.layout.seq_len)
    out = KERNELS["kitchen"](q, k, v, w, scale=0.3)
    torch.testing.assert_close(out, KERNELS["reference"](q, k, v, w, scale=0.3), atol=1e-5, rtol=1e-5)
    folded = (1,) * (3 - len(w.grid)) + w.grid
    assert written_out_na3d == [{"shape": (2, *folded, 3, 16), "scale": 0.3,
                                 "kernel_size": [min(2 * r + 1, n) for r, n in zip((0,) * (3 - len(w.grid)) + w.radius,
                                                                                   folded, strict=True)]}]


@needs_na3d
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_comfy_kitchen_equals_the_dense_masked_reference(fresh, case, dtype):
    spec, grid = CASES[case]
    w = spec.bind(TokenLayout.image_only(grid))
    q, k, v = _qkv(w.layout.seq_len, dtype)
    tol = 2e-5 if dtype is torch.float32 else 3e-2
    for scale in (None, 0.3):
        ref = KERNELS["reference"](q.float(), k.float(), v.float(), w, scale=scale)
        out = KERNELS["kitchen"](q, k, v, w, scale=scale)
        assert out.shape == ref.shape and out.dtype == dtype
        torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


@needs_na3d
def test_comfy_kitchen_masks_what_it_should_at_the_border():
    # radius (3, 2): the corner (0, 9) sees rows 0..6 and columns 5..9 (clamped: 0..3, 7..9)
    w = WindowSpec(dims=2, extent=(0.25, 0.2), border="shift").bind(TokenLayout.image_only((12, 10)))
    q, k, v = (torch.zeros(1, 1, 120, 4) for _ in range(3))
    v[0, 0, 0 * 10 + 5] = 1000.0  # (0, 5): inside the shifted box only
    v[0, 0, 0 * 10 + 4] = -1000.0  # (0, 4): outside, must not cancel it
    out = KERNELS["kitchen"](q, k, v, w)[0, 0].abs().amax(-1).view(12, 10)
    assert out[0, 9] == pytest.approx(1000.0 / 35), "the corner sees 7 x 5 keys, one of them 1000"
    ref = KERNELS["reference"](q, k, v, w)[0, 0].abs().amax(-1).view(12, 10)
    torch.testing.assert_close(out, ref)


@needs_na3d
def test_a_2d_window_through_na3d_is_na2d():
    import comfy_kitchen

    spec, grid = CASES["2d-odd"]
    w = spec.bind(TokenLayout.image_only(grid))
    q, k, v = _qkv(w.layout.seq_len, batch=1, heads=2)

    def on_grid(t):
        return t.reshape(1, 2, *grid, 16).permute(0, 2, 3, 1, 4)

    na2d = comfy_kitchen.na2d(on_grid(q), on_grid(k), on_grid(v), kitchen_module._kernel_size(w)[1:], scale=0.5)
    torch.testing.assert_close(KERNELS["kitchen"](q, k, v, w, scale=0.5), na2d.permute(0, 3, 1, 2, 4).reshape(1, 2, -1, 16))


@needs_na3d
def test_auto_measures_comfy_kitchen_against_blocked_on_this_machine(fresh):
    w = CASES["3d-odd"][0].bind(TokenLayout.image_only(CASES["3d-odd"][1]))
    q, k, v = _qkv(w.layout.seq_len)
    kernel = checked_kernel(w, q)
    assert kernel.name in ("blocked", "kitchen")
    assert set(fresh._rankings[(q.device, q.dtype, 16, w)]) == {"blocked", "kitchen"}
    torch.testing.assert_close(kernel(q, k, v, w), KERNELS["reference"](q, k, v, w), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("spec,layout,dtype,reason", [
    (WindowSpec(dims=2, extent=(0.25, 0.25)), TokenLayout.image_only((8, 8)), torch.float32, "border-shifted"),
    (WindowSpec(dims=2, extent=(0.25, 0.25), tile=(2, 2)), TokenLayout.image_only((8, 8)), torch.float32,
     "border-shifted"),
    (WindowSpec(border="shift"), TokenLayout.image_only((64,)), torch.float32, "2D and 3D"),
    (WindowSpec(dims=2, extent=(0.25, 0.25), border="shift"), TokenLayout(seq_len=64 + 7, image_start=7, grid=(8, 8)),
     torch.float32, "text"),
    (WindowSpec(dims=2, extent=(0.25, 0.25), border="shift"), TokenLayout(seq_len=64 + 7, image_start=0, grid=(8, 8)),
     torch.float32, "text"),
    (WindowSpec(dims=2, extent=(0.25, 0.25), border="shift"), TokenLayout.image_only((8, 8)), torch.float64, "float64"),
])
def test_what_comfy_kitchen_cannot_run_is_said_and_never_run(written_out_na3d, spec, layout, dtype, reason):
    w = spec.bind(layout)
    q = torch.zeros(1, 1, layout.seq_len, 8, dtype=dtype)
    assert reason in KERNELS["kitchen"].unsupported(w, q)
    assert select_kernel(w, q).name == "blocked"
    assert select_kernel(w, q, "kitchen").name == "blocked"
    with pytest.raises(ValueError):
        KERNELS["kitchen"](q, q, q, w)
    assert written_out_na3d == []


def _fallback_lines(caplog):
    return [r.getMessage() for r in caplog.records if "'kitchen'" in r.getMessage()]


@pytest.mark.parametrize("installed", ["absent", "too old (0.2.24, no na3d)"])
def test_without_na3d_the_kernel_is_never_chosen_and_a_named_one_falls_back_with_one_line(
        fresh, monkeypatch, caplog, installed):
    if installed == "absent":
        monkeypatch.setitem(sys.modules, "comfy_kitchen", None)  # import comfy_kitchen: ModuleNotFoundError
    else:
        monkeypatch.setitem(sys.modules, "comfy_kitchen", type(sys)("comfy_kitchen"))
    w = CASES["2d-odd"][0].bind(TokenLayout.image_only(CASES["2d-odd"][1]))
    q = torch.zeros(1, 2, w.layout.seq_len, 8)
    with caplog.at_level("WARNING", logger="ditfastattn"):
        assert KERNELS["kitchen"].available() is False
        assert checked_kernel(w, q).name == "blocked"
        assert usable_kernel("kitchen", "cpu") == "auto"
        assert checked_kernel(w, q, "kitchen").name == "blocked"
    lines = _fallback_lines(caplog)
    assert len(lines) == 1 and "not installed (needs comfy-kitchen >= 0.2.40" in lines[0] and "using 'auto'" in lines[0]
    assert fresh._rankings == {}, "one candidate: nothing measured"


def test_a_broken_comfy_kitchen_is_unusable_not_an_import_error(fresh, monkeypatch, caplog, tmp_path):
    package = tmp_path / "comfy_kitchen"
    package.mkdir()
    (package / "__init__.py").write_text('raise OSError("_C.so: undefined symbol: _ZN3c104cuda9SetDevice")\n')
    monkeypatch.delitem(sys.modules, "comfy_kitchen", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    w = CASES["2d-odd"][0].bind(TokenLayout.image_only(CASES["2d-odd"][1]))
    q = torch.zeros(1, 2, w.layout.seq_len, 8)
    with caplog.at_level("WARNING", logger="ditfastattn"):
        assert checked_kernel(w, q).name == "blocked"
        assert usable_kernel("kitchen", "cpu") == "auto"
        assert select_kernel(w, q, "kitchen").name == "blocked"
    lines = _fallback_lines(caplog)
    assert len(lines) == 1 and "cannot be loaded" in lines[0] and "undefined symbol" in lines[0], lines


def test_a_kitchen_failing_its_check_is_disabled_with_one_line_and_the_next_kernel_runs(fresh, monkeypatch, caplog):
    def na3d(*args, **kwargs):
        raise RuntimeError("No backend can handle 'na3d': cuda: head_dim must be a multiple of 16 and <= 64")

    monkeypatch.setattr(kitchen_module, "_load", lambda: (na3d, None))
    w = CASES["3d-odd"][0].bind(TokenLayout.image_only(CASES["3d-odd"][1]))
    q, k, v = _qkv(w.layout.seq_len)
    with caplog.at_level("WARNING", logger="ditfastattn"):
        for preference in ("kitchen", "auto", "kitchen"):
            kernel = checked_kernel(w, q, preference)
            assert kernel.name == "blocked"
            torch.testing.assert_close(kernel(q, k, v, w), KERNELS["reference"](q, k, v, w), atol=2e-5, rtol=2e-5)
    assert "kitchen" in fresh.DISABLED
    lines = [r.getMessage() for r in caplog.records if "'kitchen' disabled" in r.getMessage()]
    assert len(lines) == 1 and "No backend can handle" in lines[0], lines


def test_a_kitchen_failing_after_its_check_is_disabled_and_the_call_reruns_on_the_next(written_out_na3d, monkeypatch,
                                                                                         caplog):
    def fails_on_batches(q, k, v, kernel_size, is_causal=None, scale=None):
        if q.shape[0] > 1:
            raise RuntimeError("CUDA error: invalid configuration argument")
        return natten_na3d(q, k, v, kernel_size, is_causal, scale)

    monkeypatch.setattr(kitchen_module, "_load", lambda: (fails_on_batches, None))
    w = CASES["2d-odd"][0].bind(TokenLayout.image_only(CASES["2d-odd"][1]))
    q, k, v = _qkv(w.layout.seq_len)
    with caplog.at_level("WARNING", logger="ditfastattn"):
        kernel = checked_kernel(w, q, "kitchen")
        assert kernel.name == "kitchen"
        torch.testing.assert_close(kernel(q, k, v, w), KERNELS["reference"](q, k, v, w), atol=2e-5, rtol=2e-5)
        assert kernel.name == "blocked"
    assert len([r for r in caplog.records if "'kitchen' disabled" in r.getMessage()]) == 1


def test_a_wa_rs_layer_on_a_shifted_window_runs_on_kitchen_when_it_measures_fastest(written_out_na3d, monkeypatch):
    from ditfastattn_core import CallContext, RunState, Schedule, Strategy, attend

    monkeypatch.setattr(kernels, "time_kernel", lambda kernel, window, q: {"kitchen": 1.0}.get(kernel.name, 2.0))
    layout = TokenLayout.image_only((8, 8))
    spec = PRESETS["2D neighbourhood 1/8 (comfy-kitchen na2d)"]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, layout.seq_len, 8, generator=g) for _ in range(3))
    state = RunState(Schedule.from_letters(["F", "W"]))
    full = attend(q, k, v, Strategy.FULL, 0, CallContext(step=0, tokens=layout, window=spec), state)
    out = attend(q, k, v, Strategy.WA_RS, 0, CallContext(step=1, tokens=layout, window=spec), state)
    torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)  # WA-RS on FULL's own inputs is FULL
    assert written_out_na3d[-1]["shape"] == (2, 1, 8, 8, 2, 8), "the layer's call ran on na3d"
