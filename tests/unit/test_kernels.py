import sys
import types

import pytest
import torch

from ditfastattn_core.kernels import KERNELS, blocked, select_kernel
from ditfastattn_core.kernels.blocked import block_layout_stats
from ditfastattn_core.window import TokenLayout, WindowSpec

CASES = {
    "band-odd": (WindowSpec(), TokenLayout.image_only((37,))),
    "band-2d-grid-long": (WindowSpec(), TokenLayout.image_only((33, 41))),
    "band-tiled": (WindowSpec(tile=(64,)), TokenLayout.image_only((1000,))),
    "band-arrow-text-first": (WindowSpec(), TokenLayout(seq_len=11 + 700, image_start=11, grid=(700,))),
    "band-tiled-arrow-image-first": (WindowSpec(tile=(32,)), TokenLayout(seq_len=300 + 7, image_start=0, grid=(300,))),
    "2d": (WindowSpec(dims=2, extent=(0.25, 0.2)), TokenLayout.image_only((13, 9))),
    "2d-tiled-arrow": (WindowSpec(dims=2, extent=(0.25, 0.3), tile=(3, 4)), TokenLayout(seq_len=5 + 12 * 9 + 3, image_start=5, grid=(12, 9))),
    "3d": (WindowSpec(dims=3, extent=(0.3, 0.25, 0.25)), TokenLayout.image_only((4, 6, 5))),
    "3d-tiled-arrow": (WindowSpec(dims=3, extent=(0.3, 0.25, 0.25), tile=(1, 2, 2)), TokenLayout(seq_len=8 + 5 * 6 * 5, image_start=8, grid=(5, 6, 5))),
    # several strips and tiles, ragged on every axis, text on both sides of the image
    "2d-ragged-text-both-sides": (WindowSpec(dims=2, extent=(0.2, 0.15)), TokenLayout(seq_len=7 + 19 * 37 + 4, image_start=7, grid=(19, 37))),
    "2d-tiled-ragged": (WindowSpec(dims=2, extent=(0.125, 0.125), tile=(8, 8)), TokenLayout(seq_len=21 * 30 + 6, image_start=0, grid=(21, 30))),
    "3d-ragged-text": (WindowSpec(dims=3, extent=(0.25, 0.125, 0.125)), TokenLayout(seq_len=5 + 3 * 11 * 35, image_start=5, grid=(3, 11, 35))),
    "3d-tiled-ragged": (WindowSpec(dims=3, extent=(0.25, 0.125, 0.125), tile=(1, 8, 8)), TokenLayout.image_only((5, 12, 19))),
    # border-shifted (NATTEN) neighbourhoods: strips without padding, masked blocks elsewhere
    "2d-shift": (WindowSpec(dims=2, extent=(0.25, 0.2), border="shift"), TokenLayout.image_only((13, 9))),
    "2d-shift-ragged-text-both-sides": (WindowSpec(dims=2, extent=(0.2, 0.15), border="shift"),
                                        TokenLayout(seq_len=7 + 19 * 37 + 4, image_start=7, grid=(19, 37))),
    "2d-shift-kernel-wider-than-axis": (WindowSpec(dims=2, extent=(0.5, 0.125), border="shift"),
                                        TokenLayout.image_only((3, 40))),
    "3d-shift-ragged": (WindowSpec(dims=3, extent=(0.25, 0.125, 0.125), border="shift"), TokenLayout.image_only((3, 11, 35))),
    "3d-shift-text": (WindowSpec(dims=3, extent=(0.5, 0.25, 0.25), border="shift"),
                      TokenLayout(seq_len=5 + 4 * 6 * 5, image_start=5, grid=(4, 6, 5))),
    "band-shift-text": (WindowSpec(border="shift"), TokenLayout(seq_len=11 + 700, image_start=11, grid=(700,))),
}
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


def _qkv(layout, dtype, batch=2, heads=3, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, layout.seq_len, dim, generator=g).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("name", ["blocked", "flex"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_equals_dense_masked_reference(name, dtype, case):
    spec, layout = CASES[case]
    if name == "flex" and (dtype is torch.bfloat16 or not KERNELS["flex"].available()):
        pytest.skip("eager FlexAttention on CPU is checked in fp32 only")
    w = spec.bind(layout)
    q, k, v = _qkv(layout, dtype)
    ref = KERNELS["reference"](q.float(), k.float(), v.float(), w)
    out = KERNELS[name](q, k, v, w)
    assert out.shape == ref.shape and out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=TOL[dtype], rtol=TOL[dtype])


def test_blocked_kernel_honours_scale_and_non_contiguous_inputs():
    spec, layout = CASES["band-arrow-text-first"]
    w = spec.bind(layout)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in _qkv(layout, torch.float32))
    assert not q.is_contiguous()
    torch.testing.assert_close(
        KERNELS["blocked"](q, k, v, w, scale=0.3), KERNELS["reference"](q, k, v, w, scale=0.3)
    )


def test_reference_kernel_masks_what_it_should():
    # a value visible only through a masked-out key must not leak into the output
    layout = TokenLayout.image_only((64,))
    w = WindowSpec().bind(layout)  # radius 8
    q = torch.zeros(1, 1, 64, 4)
    k = torch.zeros(1, 1, 64, 4)
    v = torch.zeros(1, 1, 64, 4)
    v[0, 0, 63] = 1000.0
    for name in ("reference", "blocked"):
        out = KERNELS[name](q, k, v, w)
        assert out[0, 0, 0].abs().max() == 0, name
        assert out[0, 0, 60].abs().max() > 0, name


def test_block_aligned_band_has_no_masked_work():
    w = WindowSpec(tile=(256,)).bind(TokenLayout.image_only((4096,)))
    stats = block_layout_stats(w)
    assert stats["computed_fraction"] == pytest.approx(stats["window_fraction"])
    exact = block_layout_stats(WindowSpec().bind(TokenLayout.image_only((4096,))))
    assert exact["computed_fraction"] > exact["window_fraction"]


SPLIT_CASES = {
    "odd": (WindowSpec(), TokenLayout.image_only((1001,)), 7),
    "chunk-equals-radius": (WindowSpec(), TokenLayout.image_only((1000,)), 125),
    "chunk-1": (WindowSpec(), TokenLayout.image_only((37,)), 1),
    "text-first": (WindowSpec(), TokenLayout(seq_len=11 + 700, image_start=11, grid=(700,)), 50),
    "image-first": (WindowSpec(), TokenLayout(seq_len=300 + 7, image_start=0, grid=(300,)), 16),
    "2d-grid": (WindowSpec(), TokenLayout.image_only((33, 41)), 100),
    "tiled": (WindowSpec(tile=(16,)), TokenLayout.image_only((1000,)), 48),
    "tiled-ragged-text": (WindowSpec(tile=(10,)), TokenLayout(seq_len=5 + 997, image_start=5, grid=(997,)), 80),
    "tiled-two-tiles": (WindowSpec(tile=(32,)), TokenLayout(seq_len=700 + 9, image_start=0, grid=(700,)), 64),
}


def test_a_border_shifted_band_never_takes_the_split_route():
    """The split parts assume a band cut off at the borders: a shifted one takes masked blocks."""
    w = WindowSpec(border="shift").bind(TokenLayout.image_only((8000,)))  # radius 1000 >= the chunk
    assert blocked._split_chunk(w, "cpu") is None
    q, k, v = _qkv(w.layout, torch.float32, batch=1, heads=1, dim=4)
    with pytest.raises(ValueError, match="border-shifted"):
        blocked._split_band_attention(q, k, v, w, None, 768)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(SPLIT_CASES))
def test_split_band_equals_dense_masked_reference(dtype, case):
    spec, layout, chunk = SPLIT_CASES[case]
    w = spec.bind(layout)
    q, k, v = _qkv(layout, dtype)
    ref = KERNELS["reference"](q.float(), k.float(), v.float(), w, scale=0.3)
    out = blocked._split_band_attention(q, k, v, w, 0.3, chunk)
    assert out.shape == ref.shape and out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize(
    "spec,chunk",
    [(WindowSpec(), 11), (WindowSpec(), 0), (WindowSpec(tile=(4,)), 6), (WindowSpec(tile=(4,)), 32)],
)
def test_split_band_refuses_a_chunk_it_cannot_split(spec, chunk):
    w = spec.bind(TokenLayout.image_only((80,)))  # radius 10; tiled: 7 tiles of 4 = 28 keys
    q, k, v = _qkv(w.layout, torch.float32)
    with pytest.raises(ValueError, match="chunk"):
        blocked._split_band_attention(q, k, v, w, None, chunk)


def test_wide_bands_on_cpu_take_the_split_route(monkeypatch):
    calls = []
    real = blocked._split_band_attention

    def spy(*args):
        calls.append(args[-1])
        return real(*args)

    monkeypatch.setattr(blocked, "_split_band_attention", spy)
    monkeypatch.setattr(blocked, "SPLIT_CHUNK_1D", 32)
    layout = TokenLayout.image_only((512,))  # radius 64
    cases = {
        "exact": (WindowSpec(), 32),
        "exact-narrow": (WindowSpec(extent=(0.05,)), None),  # radius 25 < 32
        "tiled-small": (WindowSpec(tile=(8,)), 32),  # 4 tiles a chunk, 136 keys a tile
        "tiled-short": (WindowSpec(extent=(0.03,), tile=(8,)), None),  # 40 keys a tile <= 2 * 32
        "tiled-big": (WindowSpec(tile=(32,)), None),  # one tile a chunk: nothing to gain
        "2d": (WindowSpec(dims=2, extent=(0.25, 0.25)), None),
        "exact-shifted": (WindowSpec(border="shift"), None),
    }
    for name, (spec, expected) in cases.items():
        calls.clear()
        w = spec.bind(TokenLayout.image_only((16, 32)) if spec.dims == 2 else layout)
        q, k, v = _qkv(w.layout, torch.float32, batch=1, heads=2)
        torch.testing.assert_close(
            KERNELS["blocked"](q, k, v, w), KERNELS["reference"](q, k, v, w), atol=2e-5, rtol=2e-5
        )
        assert calls == ([expected] if expected else []), name
        if expected:
            stats = block_layout_stats(w)
            assert stats["computed_fraction"] == pytest.approx(stats["window_fraction"]), "no masked work"


def test_boxes_on_cpu_take_the_strip_route_and_tiled_ones_waste_nothing(monkeypatch):
    from ditfastattn_core.kernels import strips

    calls = []
    real = strips.strip_attention
    monkeypatch.setattr(blocked, "strip_attention", lambda *a: calls.append(a[3].spec) or real(*a))
    for case, strip_route in (("2d", True), ("2d-tiled-ragged", False), ("3d-ragged-text", True),
                              ("3d-tiled-ragged", True), ("2d-shift-ragged-text-both-sides", True),
                              ("3d-shift-ragged", True), ("band-shift-text", False)):
        calls.clear()
        spec, layout = CASES[case]
        w = spec.bind(layout)
        q, k, v = _qkv(layout, torch.float32, batch=1, heads=2)
        torch.testing.assert_close(KERNELS["blocked"](q, k, v, w), KERNELS["reference"](q, k, v, w), atol=2e-5, rtol=2e-5)
        assert calls == ([spec] if strip_route else []), case
        assert strips.strips_usable(w, "cpu") == strip_route and not strips.strips_usable(w, "cuda"), case
        stats = block_layout_stats(w)
        if not spec.exact and layout.grid[-1] % spec.tile[-1] == 0 and layout.grid[-2] % spec.tile[-2] == 0:
            assert stats["computed_fraction"] == pytest.approx(stats["window_fraction"]), case
        assert stats["computed_fraction"] >= stats["window_fraction"], case


def test_strip_route_masks_what_it_should():
    # a huge value in a key just outside a 2D box, and in the zero padding's neighbour, must not leak
    layout = TokenLayout.image_only((16, 24))
    w = WindowSpec(dims=2, extent=(0.125, 0.125)).bind(layout)  # radius (2, 3)
    q, k = torch.zeros(1, 1, layout.seq_len, 4), torch.zeros(1, 1, layout.seq_len, 4)
    v = torch.zeros(1, 1, layout.seq_len, 4)
    v[0, 0, 5 * 24 + 10] = 1000.0  # (5, 10)
    out = KERNELS["blocked"](q, k, v, w)[0, 0].abs().amax(-1).view(16, 24)
    seen = out > 0
    assert seen[3:8, 7:14].all() and seen.sum() == 5 * 7


def test_wrong_sequence_length_raises():
    spec, layout = CASES["band-odd"]
    q, k, v = _qkv(TokenLayout.image_only((40,)), torch.float32)
    with pytest.raises(ValueError, match="does not match"):
        KERNELS["blocked"](q, k, v, spec.bind(layout))


# --- selection ------------------------------------------------------------------------------


class _FakeQ:
    """Stands in for a CUDA tensor: selection only looks at device, dtype and shape."""

    def __init__(self, device="cuda", dtype=torch.bfloat16, shape=(1, 16, 4096, 64)):
        self.device = torch.device(device)
        self.dtype = dtype
        self.shape = shape


@pytest.fixture
def fake_flash(monkeypatch):
    """A CPU stand-in for flash_attn.flash_attn_func with flash-attn's window semantics:
    (B, L, H, D) tensors, key j visible from query i iff i - left <= j <= i + right."""
    calls = []

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1)):
        calls.append({"window_size": window_size, "causal": causal, "shape": tuple(q.shape)})
        left, right = window_size
        n = q.shape[1]
        i = torch.arange(n)[:, None]
        j = torch.arange(n)[None, :]
        mask = (j >= i - left) & (j <= i + right)
        o = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=softmax_scale
        )
        return o.transpose(1, 2)

    module = types.ModuleType("flash_attn")
    module.flash_attn_func = flash_attn_func
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    monkeypatch.setitem(KERNELS, "flash", KERNELS["flash"].__class__(
        "flash", KERNELS["flash"].fn, lambda: True, KERNELS["flash"].unsupported))
    return calls


def test_auto_on_cpu_is_blocked():
    w = WindowSpec().bind(TokenLayout.image_only((64,)))
    assert select_kernel(w, torch.zeros(1, 1, 64, 8)).name == "blocked"


def test_auto_on_cuda_prefers_flash_for_an_exact_band(fake_flash):
    w = WindowSpec().bind(TokenLayout.image_only((4096,)))
    assert select_kernel(w, _FakeQ()).name == "flash"
    # fp32, a text span, or a tiled window: flash cannot express them
    assert select_kernel(w, _FakeQ(dtype=torch.float32)).name != "flash"
    arrow = WindowSpec().bind(TokenLayout(seq_len=4096 + 77, image_start=77, grid=(4096,)))
    assert select_kernel(arrow, _FakeQ()).name != "flash"
    tiled = WindowSpec(tile=(128,)).bind(TokenLayout.image_only((4096,)))
    assert select_kernel(tiled, _FakeQ()).name != "flash"


def test_auto_on_cuda_uses_flex_for_power_of_two_heads_else_blocked(monkeypatch):
    monkeypatch.setitem(KERNELS, "flash", KERNELS["flash"].__class__(
        "flash", KERNELS["flash"].fn, lambda: False, KERNELS["flash"].unsupported))
    w = WindowSpec(dims=2, extent=(0.125, 0.125)).bind(TokenLayout.image_only((64, 64)))
    expected = "flex" if KERNELS["flex"].available() else "blocked"
    assert select_kernel(w, _FakeQ(shape=(1, 16, 4096, 64))).name == expected
    assert select_kernel(w, _FakeQ(shape=(1, 16, 4096, 72))).name == "blocked"


def test_named_kernel_is_checked():
    w = WindowSpec(tile=(16,)).bind(TokenLayout.image_only((64,)))
    q = torch.zeros(1, 1, 64, 8)
    assert select_kernel(w, q, "reference").name == "reference"
    with pytest.raises(ValueError, match="unknown window kernel"):
        select_kernel(w, q, "triton-magic")



def test_a_named_kernel_that_cannot_run_falls_back_with_one_line(caplog):
    from ditfastattn_core.kernels import _warn_fallback, usable_kernel

    _warn_fallback.cache_clear()
    w = WindowSpec(tile=(16,)).bind(TokenLayout.image_only((64,)))
    q = torch.zeros(1, 1, 64, 8)
    with caplog.at_level("WARNING", logger="ditfastattn"):
        assert select_kernel(w, q, "flash").name == "blocked"  # CPU: flash never runs here
        assert select_kernel(w, q, "flash").name == "blocked"
        assert usable_kernel("flash", "cpu") == "auto"
        assert usable_kernel("blocked", "cpu") == "blocked"
    lines = [r.getMessage() for r in caplog.records if "'flash'" in r.getMessage()]
    assert len(lines) == 1 and "using 'auto'" in lines[0], lines
    with pytest.raises(ValueError, match="unknown window kernel"):
        usable_kernel("triton-magic", "cpu")


def test_flash_kernel_passes_a_symmetric_window_and_matches_reference(fake_flash):
    layout = TokenLayout.image_only((96,))
    w = WindowSpec().bind(layout)
    q, k, v = _qkv(layout, torch.float32)
    out = KERNELS["flash"](q, k, v, w)
    assert fake_flash[-1]["window_size"] == (12, 12)  # never (-w, w): that is unbounded left
    assert fake_flash[-1]["causal"] is False
    torch.testing.assert_close(out, KERNELS["reference"](q, k, v, w))


# --- fail-safe kernels: failures simulated on the CPU ------------------------------------------------


@pytest.fixture
def fresh_checks(monkeypatch):
    """A process in which no kernel has been checked or disabled yet."""
    from ditfastattn_core import kernels

    monkeypatch.setattr(kernels, "DISABLED", {})
    monkeypatch.setattr(kernels, "_checked", {})
    monkeypatch.setattr(kernels, "_rankings", {})
    return kernels


def _failing(name: str, fn, available=lambda: True):
    return KERNELS[name].__class__(name, fn, available, KERNELS[name].unsupported)


def _run_window(strategy_window=None, seed=0):
    """A WA-RS layer through the engine (which picks its kernel by ``checked_kernel``)."""
    from ditfastattn_core import CallContext, RunState, Schedule, Strategy, attend

    layout = TokenLayout.image_only((8, 8))
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, layout.seq_len, 8, generator=g) for _ in range(3))
    state = RunState(Schedule.from_letters(["F", "W"]))
    ctx = dict(tokens=layout, window=strategy_window or WindowSpec(dims=2, extent=(0.25, 0.25)))
    full = attend(q, k, v, Strategy.FULL, 0, CallContext(step=0, **ctx), state)
    return attend(q, k, v, Strategy.WA_RS, 0, CallContext(step=1, **ctx), state), full


@pytest.mark.parametrize("failure", ["compile error", "no triton", "wrong numbers", "nan"])
def test_a_kernel_failing_its_check_is_disabled_with_one_line_and_the_run_completes(
        fresh_checks, monkeypatch, caplog, failure):
    def broken(q, k, v, window, scale=None):
        if failure == "compile error":
            raise RuntimeError("torch._dynamo.exc.BackendCompilerFailed: backend='inductor' raised")
        if failure == "no triton":
            raise RuntimeError("Cannot find a working triton installation")
        out = KERNELS["reference"](q, k, v, window, scale)
        return out + 0.5 if failure == "wrong numbers" else out * float("nan")

    monkeypatch.setitem(KERNELS, "blocked", _failing("blocked", broken))
    with caplog.at_level("WARNING", logger="ditfastattn"):
        for seed in range(3):  # three model calls
            out, full = _run_window(seed=seed)
            torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)  # WA-RS on the same inputs = FULL
    lines = [r.getMessage() for r in caplog.records if "'blocked' disabled" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "blocked" in fresh_checks.DISABLED
    w = WindowSpec().bind(TokenLayout.image_only((64,)))
    assert select_kernel(w, torch.zeros(1, 1, 64, 8)).name == "reference", "the last resort is the definition"


def test_an_unloadable_extension_falls_back_with_one_line(fresh_checks, monkeypatch, caplog):
    from ditfastattn_core.kernels import _warn_fallback, checked_kernel, usable_kernel

    def unloadable():
        raise OSError("flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDevice")

    _warn_fallback.cache_clear()
    monkeypatch.setitem(KERNELS, "flex", _failing("flex", KERNELS["flex"].fn, unloadable))
    w = WindowSpec().bind(TokenLayout.image_only((64,)))
    with caplog.at_level("WARNING", logger="ditfastattn"):
        assert usable_kernel("flex", "cpu") == "auto"
        assert checked_kernel(w, torch.zeros(1, 1, 64, 8), "flex").name == "blocked"
    assert len([r for r in caplog.records if "cannot be loaded" in r.getMessage()]) == 1


def test_a_kernel_that_fails_after_its_check_is_disabled_and_the_call_reruns(fresh_checks, monkeypatch, caplog):
    """A failure on a call the check did not see (say, a batch the kernel cannot tile)."""
    calls = []

    def fails_on_batches(q, k, v, window, scale=None):
        calls.append(q.shape)
        if q.shape[0] * q.shape[1] > 1:
            raise RuntimeError("CUDA error: invalid configuration argument")
        return KERNELS["reference"](q, k, v, window, scale)

    monkeypatch.setitem(KERNELS, "blocked", _failing("blocked", fails_on_batches))
    with caplog.at_level("WARNING", logger="ditfastattn"):
        out, full = _run_window()
    torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)
    assert calls[0][:2] == (1, 1), "checked on one row and one head first"
    assert "blocked" in fresh_checks.DISABLED
    assert len([r for r in caplog.records if "disabled" in r.getMessage()]) == 1


def test_working_kernels_pass_their_check_once_per_shape(fresh_checks, monkeypatch):
    from ditfastattn_core.kernels import checked_kernel, kernel_check

    seen = []
    original = fresh_checks.kernel_check

    def counting(kernel, window, q):
        seen.append(kernel.name)
        return original(kernel, window, q)

    monkeypatch.setattr(fresh_checks, "kernel_check", counting)
    names = ("blocked", "flex") if KERNELS["flex"].available() else ("blocked",)
    for name in names:
        for dtype in (torch.float32, torch.bfloat16):
            w = WindowSpec(dims=2, extent=(0.25, 0.25)).bind(TokenLayout.image_only((16, 16)))
            q = torch.zeros(1, 1, 256, 16, dtype=dtype)
            assert kernel_check(KERNELS[name], w, q) is None, (name, dtype)
            for _ in range(3):
                assert checked_kernel(w, q, name).name == name
    assert sorted(seen) == sorted(n for n in names for _ in range(2)), "once per kernel and dtype"
    assert not fresh_checks.DISABLED


# --- auto by measured speed -------------------------------------------------------------------

SHIFTED = WindowSpec(dims=2, extent=(0.25, 0.25), border="shift")


@pytest.fixture
def measured(fresh_checks, monkeypatch):
    """A process with an exact stand-in for comfy-kitchen's kernel (so blocked and kitchen can
    both run a border-shifted window on the CPU) and a timer that reads ``times``."""
    from ditfastattn_core.kernels.kitchen import kitchen_unsupported

    monkeypatch.setitem(KERNELS, "kitchen", KERNELS["kitchen"].__class__(
        "kitchen", KERNELS["reference"].fn, lambda: True, kitchen_unsupported))
    times, calls = {"blocked": 2.0, "kitchen": 1.0}, []

    def timer(kernel, window, q):
        calls.append((kernel.name, q.dtype, q.shape[-1], window))
        return times[kernel.name]

    monkeypatch.setattr(fresh_checks, "time_kernel", timer)
    return types.SimpleNamespace(times=times, calls=calls, kernels=fresh_checks)


def test_auto_runs_the_kernel_measured_fastest_once_per_device_dtype_head_dim_and_window(measured):
    from ditfastattn_core.kernels import checked_kernel

    w = SHIFTED.bind(TokenLayout.image_only((8, 8)))
    q = torch.zeros(1, 2, 64, 8)
    assert checked_kernel(w, q).name == "kitchen"
    assert sorted(c[0] for c in measured.calls) == ["blocked", "kitchen"], "each candidate timed once"
    measured.times.update(blocked=0.5)  # a later measurement would say otherwise: it is not taken
    for _ in range(3):
        assert checked_kernel(w, q).name == "kitchen"
    assert len(measured.calls) == 2
    assert checked_kernel(w, q.to(torch.bfloat16)).name == "blocked", "another dtype is measured anew"
    assert checked_kernel(w, torch.zeros(1, 2, 64, 16)).name == "blocked", "another head dim too"
    assert len(measured.calls) == 6
    assert select_kernel(w, q).name == "blocked", "select_kernel keeps the fixed order"


def test_auto_breaks_a_tie_by_the_fixed_order_and_times_nothing_with_one_candidate(measured):
    from ditfastattn_core.kernels import checked_kernel

    measured.times.update(blocked=1.0, kitchen=1.0)
    w = SHIFTED.bind(TokenLayout.image_only((8, 8)))
    assert checked_kernel(w, torch.zeros(1, 1, 64, 8)).name == "blocked"
    measured.calls.clear()
    clamped = WindowSpec(dims=2, extent=(0.25, 0.25)).bind(TokenLayout.image_only((8, 8)))
    text = SHIFTED.bind(TokenLayout(seq_len=64 + 3, image_start=3, grid=(8, 8)))
    for window in (clamped, text):  # kitchen cannot run these: nothing to choose between
        assert checked_kernel(window, torch.zeros(1, 1, window.layout.seq_len, 8)).name == "blocked"
    assert checked_kernel(w, torch.zeros(1, 1, 64, 8), "blocked").name == "blocked", "a named kernel is not timed"
    assert measured.calls == []


def test_auto_skips_a_measured_kernel_that_fails_and_falls_back_to_the_next_measured(measured, monkeypatch, caplog):
    from ditfastattn_core.kernels import checked_kernel

    def fails_on_batches(q, k, v, window, scale=None):
        if q.shape[0] > 1:
            raise RuntimeError("CUDA error: invalid configuration argument")
        return KERNELS["reference"](q, k, v, window, scale)

    monkeypatch.setitem(KERNELS, "kitchen", _failing("kitchen", fails_on_batches))
    w = SHIFTED.bind(TokenLayout.image_only((8, 8)))
    q, k, v = (torch.randn(2, 2, 64, 8) for _ in range(3))
    with caplog.at_level("WARNING", logger="ditfastattn"):
        kernel = checked_kernel(w, q)
        assert kernel.name == "kitchen"
        torch.testing.assert_close(kernel(q, k, v, w), KERNELS["reference"](q, k, v, w))
        assert kernel.name == "blocked" and checked_kernel(w, q).name == "blocked"
    assert len(measured.calls) == 2, "the fallback comes from the measurement, not a new one"
    assert len([r for r in caplog.records if "'kitchen' disabled" in r.getMessage()]) == 1


def test_auto_does_not_time_a_kernel_that_fails_its_check(measured, monkeypatch, caplog):
    from ditfastattn_core.kernels import checked_kernel

    monkeypatch.setitem(KERNELS, "kitchen", _failing("kitchen", lambda q, k, v, window, scale=None: q + 1))
    w = SHIFTED.bind(TokenLayout.image_only((8, 8)))
    with caplog.at_level("WARNING", logger="ditfastattn"):
        assert checked_kernel(w, torch.zeros(1, 1, 64, 8)).name == "blocked"
    assert [c[0] for c in measured.calls] == ["blocked"]
    assert len([r for r in caplog.records if "'kitchen' disabled" in r.getMessage()]) == 1


def test_a_kernel_that_raises_while_being_timed_is_disabled_and_not_chosen(measured, monkeypatch, caplog):
    from ditfastattn_core.kernels import checked_kernel

    def timer(kernel, window, q):
        if kernel.name == "kitchen":
            raise RuntimeError("out of shared memory for this tile")
        return 1.0

    monkeypatch.setattr(measured.kernels, "time_kernel", timer)
    w = SHIFTED.bind(TokenLayout.image_only((8, 8)))
    with caplog.at_level("WARNING", logger="ditfastattn"):
        assert checked_kernel(w, torch.zeros(1, 1, 64, 8)).name == "blocked"
    assert "kitchen" in measured.kernels.DISABLED
    assert len([r for r in caplog.records if "'kitchen' disabled" in r.getMessage()]) == 1


def test_the_timer_times_a_slice_of_the_call(fresh_checks):
    w = SHIFTED.bind(TokenLayout.image_only((8, 8)))
    seen = []

    def spy(q, k, v, window, scale=None):
        seen.append(tuple(q.shape))
        return KERNELS["reference"](q, k, v, window, scale)

    seconds = fresh_checks.time_kernel(_failing("blocked", spy), w, torch.zeros(3, 16, 64, 8))
    assert seconds > 0
    assert seen == [(1, fresh_checks.TIMING_HEADS, 64, 8)] * 2, "one warm-up and one timed call"


def test_auto_on_cuda_keeps_its_order_as_the_tie_break(fake_flash, monkeypatch):
    from ditfastattn_core.kernels import _auto_candidates
    from ditfastattn_core.kernels.kitchen import kitchen_unsupported

    monkeypatch.setitem(KERNELS, "kitchen", KERNELS["kitchen"].__class__(
        "kitchen", KERNELS["kitchen"].fn, lambda: True, kitchen_unsupported))
    monkeypatch.setitem(KERNELS, "flex", KERNELS["flex"].__class__("flex", KERNELS["flex"].fn, lambda: True,
                                                                    KERNELS["flex"].unsupported))
    shifted = SHIFTED.bind(TokenLayout.image_only((64, 64)))
    assert [k.name for k in _auto_candidates(shifted, _FakeQ())] == ["flex", "kitchen", "blocked"]
    assert [k.name for k in _auto_candidates(shifted, _FakeQ(shape=(1, 16, 4096, 72)))] == ["kitchen", "blocked"]
    band = WindowSpec().bind(TokenLayout.image_only((4096,)))
    assert [k.name for k in _auto_candidates(band, _FakeQ())] == ["flash", "flex", "blocked"]
