"""Window-attention kernels and their selection by device, dtype and availability.

Every kernel computes the same function, ``Window.allowed``-masked softmax attention on
(B, H, L, D) tensors; they differ only in speed and in which windows they can express. A
kernel is never chosen for a window it cannot express.

Fail-safe on machines the code has never run on: ``checked_kernel`` runs the chosen kernel
once per (device, dtype, head dim, window) on a one-row, one-head input against dense masked
attention; an exception (a compile failure, Triton missing, an unloadable flash-attn) or a
mismatch disables that kernel for the process with one warning line, and the next kernel is
chosen. A kernel that fails later, on a call its check did not see, is disabled the same way
and the call runs again on the next one (``FailSafeKernel``).

"auto" by measurement: where more than one kernel auto may use can run a window on a device,
dtype and head dim (say comfy-kitchen's na3d and blocked SDPA for a border-shifted window),
``checked_kernel`` times each once after its check, on a slice of the call's shape, and keeps
the fastest for that (device, dtype, head dim, window); the fixed order breaks ties.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..window import Window
from .blocked import blocked_window_attention
from .flash import MAX_HEAD_DIM, SUPPORTED_DTYPES, flash_available, flash_window_attention
from .flex import flex_available, flex_window_attention
from .kitchen import REQUIREMENT as KITCHEN_REQUIREMENT
from .kitchen import kitchen_available, kitchen_unsupported, kitchen_window_attention
from .reference import reference_window_attention

WindowKernelFn = Callable[..., torch.Tensor]
AUTO = "auto"
log = logging.getLogger("ditfastattn")


@dataclass(frozen=True)
class WindowKernel:
    name: str
    fn: WindowKernelFn
    available: Callable[[], bool]
    unsupported: Callable[[Window, torch.Tensor], str | None]
    """Why this kernel cannot run this window on this q, or None if it can."""
    needs: str = ""
    """What to install when it is not available (said in the fallback warning)."""

    def __call__(self, q, k, v, window: Window, scale: float | None = None) -> torch.Tensor:
        return self.fn(q, k, v, window, scale)


def _any(window: Window, q: torch.Tensor) -> str | None:
    return None


def _flash_unsupported(window: Window, q: torch.Tensor) -> str | None:
    if q.device.type != "cuda":
        return "flash-attn runs on CUDA only"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"flash-attn needs fp16 or bf16, got {q.dtype}"
    if q.shape[-1] > MAX_HEAD_DIM or q.shape[-1] % 8:
        return f"flash-attn needs a head dim that is a multiple of 8 up to {MAX_HEAD_DIM}"
    if window.band_half_width is None:
        return "flash-attn expresses only an exact 1D band over a pure image sequence"
    return None


def _flex_unsupported(window: Window, q: torch.Tensor) -> str | None:
    d = q.shape[-1]
    if q.device.type == "cuda" and (d < 16 or d & (d - 1)):
        # Triton flex kernels want power-of-two head dims; others go to flash or blocked.
        return f"FlexAttention on CUDA is used for power-of-two head dims only, got {d}"
    return None


KERNELS: dict[str, WindowKernel] = {
    k.name: k
    for k in (
        WindowKernel("flash", flash_window_attention, flash_available, _flash_unsupported),
        WindowKernel("flex", flex_window_attention, flex_available, _flex_unsupported),
        WindowKernel("blocked", blocked_window_attention, lambda: True, _any),
        WindowKernel("reference", reference_window_attention, lambda: True, _any),
        WindowKernel("kitchen", kitchen_window_attention, kitchen_available, kitchen_unsupported,
                     needs=KITCHEN_REQUIREMENT),
    )
}

_AUTO_ORDER = {"cuda": ("flash", "flex", "kitchen", "blocked")}
_AUTO_DEFAULT = ("blocked", "kitchen")
"""Kernels auto may use per device type, in the order that breaks ties of measured speed."""


def kernel_names() -> list[str]:
    return [AUTO, *KERNELS]


@functools.cache
def _warn_fallback(preference: str, reason: str) -> None:
    log.warning("FastAttn: window kernel %r cannot run here (%s); using 'auto' instead", preference, reason)


def unknown_kernel(preference: str) -> str | None:
    """Why ``preference`` names no window kernel (what to choose instead), or None if it names one."""
    if preference == AUTO or preference in KERNELS:
        return None
    return f"unknown window kernel {preference!r}: choose one of {', '.join(kernel_names())}"


def usable_kernel(preference: str, device: torch.device | str) -> str:
    """``preference`` if it can run on ``device`` here, else "auto" with one warning line:
    a workflow made on a machine with flash-attn still runs on one without it."""
    unknown = unknown_kernel(preference)
    if unknown is not None:
        raise ValueError(unknown)
    kernel = KERNELS.get(preference)
    if kernel is None:
        return AUTO
    reason = _unusable(kernel)
    on_cuda = torch.device(device).type == "cuda"
    if not reason and preference == "flash" and not on_cuda:
        reason = "flash-attn runs on CUDA only"
    if not reason and preference == "flex" and not on_cuda:
        reason = "FlexAttention is compiled on CUDA only; here it would run unfused, slower than the blocked kernel"
    if not reason:
        return preference
    _warn_fallback(preference, reason)
    return AUTO


def select_kernel(window: Window, q: torch.Tensor, preference: str = AUTO) -> WindowKernel:
    """The kernel to run ``window`` on ``q``: the named one when it can, else (one warning
    line) the best available. Kernels disabled by a failed check are never chosen."""
    if preference != AUTO:
        unknown = unknown_kernel(preference)
        if unknown is not None:
            raise ValueError(unknown)
        kernel = KERNELS[preference]
        reason = _unusable(kernel) or kernel.unsupported(window, q)
        if not reason:
            return kernel
        _warn_fallback(preference, reason)
    candidates = _auto_candidates(window, q)
    if candidates:
        return candidates[0]
    return KERNELS["blocked"] if "blocked" not in DISABLED else KERNELS["reference"]


def _auto_candidates(window: Window, q: torch.Tensor) -> list[WindowKernel]:
    """The kernels auto may run ``window`` on ``q`` with, in tie-break order (what a kernel
    cannot express is asked first: that needs no import of an optional package)."""
    kernels = (KERNELS[name] for name in _AUTO_ORDER.get(q.device.type, _AUTO_DEFAULT))
    return [k for k in kernels if k.unsupported(window, q) is None and not _unusable(k)]


def _unusable(kernel: WindowKernel) -> str | None:
    if kernel.name in DISABLED:
        return f"it failed on this machine ({DISABLED[kernel.name]})"
    try:
        if kernel.available():
            return None
        return f"it is not installed (needs {kernel.needs})" if kernel.needs else "it is not installed"
    except Exception as e:  # an extension that is installed but cannot be loaded (a mismatched wheel)
        return f"it cannot be loaded ({_describe(e)})"


def _describe(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else "no message"
    return f"{type(e).__name__}: {text}"


_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
"""Not a kernel failure: the caller's to handle (ComfyUI frees memory and retries)."""


# --- fail-safe: a kernel checked once per shape, disabled for the process when it fails -------

DISABLED: dict[str, str] = {}
"""Kernels that failed on this machine, with why: never chosen again in this process."""
_checked: dict[tuple, bool] = {}
_lock = threading.Lock()
CHECK_ROWS = 64
"""Query rows of the check compared with dense attention (spread over the sequence)."""


def check_tolerance(dtype: torch.dtype) -> float:
    """The largest absolute difference from dense attention a kernel may show (inputs ~N(0, 1))."""
    return {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 2e-2)


def disable(kernel: WindowKernel, reason: str) -> None:
    """Take ``kernel`` out of selection for this process, with one warning line."""
    with _lock:
        if kernel.name in DISABLED or kernel.name == "reference":
            return
        DISABLED[kernel.name] = reason
    log.warning("FastAttn: window kernel %r disabled on this machine (%s); using the next kernel", kernel.name, reason)


def kernel_check(kernel: WindowKernel, window: Window, q: torch.Tensor) -> str | None:
    """Why ``kernel`` cannot be trusted for ``window`` on ``q``'s device, dtype and head dim
    (it raised, or differs from dense masked attention on a one-row, one-head input), or None."""
    g = torch.Generator().manual_seed(0)
    shape = (1, 1, window.layout.seq_len, q.shape[-1])
    qs, ks, vs = (torch.randn(shape, generator=g).to(device=q.device, dtype=q.dtype) for _ in range(3))
    try:
        out = kernel(qs, ks, vs, window)
    except _OUT_OF_MEMORY:
        raise
    except Exception as e:  # compile failures, missing Triton, unloadable extensions, ...
        return _describe(e)
    # the reference in float64 on the CPU (some devices, such as MPS, have no float64)
    rows = torch.linspace(0, shape[2] - 1, min(CHECK_ROWS, shape[2])).round().long().unique()
    mask = window.allowed(rows[:, None], torch.arange(shape[2])[None, :])
    qd, kd, vd = (t.cpu().double() for t in (qs, ks, vs))
    want = torch.nn.functional.scaled_dot_product_attention(qd[:, :, rows], kd, vd, attn_mask=mask)
    err = (out.cpu().double()[:, :, rows] - want).abs().max().item()
    tol = check_tolerance(q.dtype)
    if not math.isfinite(err) or err > tol:
        return (f"its output differs from dense attention by {err:.3g} (allowed {tol:g}) on {q.device.type} "
                f"{str(q.dtype).removeprefix('torch.')}, head dim {q.shape[-1]}")
    return None


def checked_kernel(window: Window, q: torch.Tensor, preference: str = AUTO) -> FailSafeKernel:
    """``select_kernel``'s choice, checked once per (kernel, device, dtype, head dim, window);
    a kernel that fails its check is disabled and the next one chosen. Where auto chooses
    (asked for, or the named kernel cannot run) among several kernels, the fastest measured."""
    while True:
        kernel = select_kernel(window, q, preference)
        if kernel.name != preference:
            kernel = _fastest(window, q) or kernel
        if kernel.name == "reference" or _passes_check(kernel, window, q):
            return FailSafeKernel(kernel, preference)


def _passes_check(kernel: WindowKernel, window: Window, q: torch.Tensor) -> bool:
    """``kernel_check`` once per (kernel, device, dtype, head dim, window); a failure disables it."""
    key = (kernel.name, q.device, q.dtype, q.shape[-1], window)
    with _lock:
        ok = _checked.get(key)
    if ok is None:
        reason = kernel_check(kernel, window, q)
        ok = reason is None
        with _lock:
            _checked[key] = ok
        if reason is not None:
            disable(kernel, reason)
    if not ok and kernel.name not in DISABLED:  # failed for this shape only: never again for it
        disable(kernel, "it failed its check on this machine")
    return ok


# --- auto by measurement: the fastest checked kernel per (device, dtype, head dim, window) ----

_rankings: dict[tuple, tuple[str, ...]] = {}
"""Per (device, dtype, head dim, window): the kernels that passed, fastest first."""
TIMING_HEADS = 4
"""Heads of the slice auto times (one batch row, the whole sequence): enough to fill a
kernel's blocks, a fraction of a layer's work."""


def time_kernel(kernel: WindowKernel, window: Window, q: torch.Tensor) -> float:
    """Seconds ``kernel`` takes on a slice of ``q``'s shape, after one warm-up call (caches,
    compilation). Replaced in tests, where a measurement must not decide."""
    g = torch.Generator().manual_seed(1)
    shape = (1, min(q.shape[1], TIMING_HEADS), window.layout.seq_len, q.shape[-1])
    qs, ks, vs = (torch.randn(shape, generator=g).to(device=q.device, dtype=q.dtype) for _ in range(3))

    def sync() -> None:
        if q.device.type == "cuda":
            torch.cuda.synchronize(q.device)

    kernel(qs, ks, vs, window)
    sync()
    start = time.perf_counter()
    kernel(qs, ks, vs, window)
    sync()
    return time.perf_counter() - start


def _fastest(window: Window, q: torch.Tensor) -> WindowKernel | None:
    """The fastest usable kernel auto may run here, measured once per (device, dtype, head
    dim, window) after each candidate passed its check; None when at most one can run."""
    candidates = _auto_candidates(window, q)
    if len(candidates) < 2:
        return None
    key = (q.device, q.dtype, q.shape[-1], window)
    with _lock:
        ranking = _rankings.get(key)
    if ranking is None:
        times: dict[str, float] = {}
        for kernel in candidates:
            seconds = _timed(kernel, window, q) if _passes_check(kernel, window, q) else None
            if seconds is not None:
                times[kernel.name] = seconds
        order = [k.name for k in candidates]
        ranking = tuple(sorted(times, key=lambda name: (times[name], order.index(name))))
        with _lock:
            _rankings[key] = ranking
        log.info("FastAttn: window kernel timings on %s %s, head dim %d, %s: %s", q.device.type,
                 str(q.dtype).removeprefix("torch."), q.shape[-1], window.spec,
                 ", ".join(f"{name} {times[name] * 1e3:.3g} ms" for name in ranking))
    for name in ranking:
        kernel = KERNELS[name]
        if not _unusable(kernel) and kernel.unsupported(window, q) is None:
            return kernel
    return None


def _timed(kernel: WindowKernel, window: Window, q: torch.Tensor) -> float | None:
    """``time_kernel``'s seconds, or None (and the kernel disabled) if it raised on the slice."""
    try:
        return time_kernel(kernel, window, q)
    except _OUT_OF_MEMORY:
        raise
    except Exception as e:
        disable(kernel, _describe(e))
        return None


@dataclass
class FailSafeKernel:
    """A checked kernel; if it raises on a call its check did not see, it is disabled and the
    call runs on the next kernel (out of memory excepted: that is the caller's to handle)."""

    kernel: WindowKernel
    preference: str = AUTO
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def name(self) -> str:
        return self.kernel.name

    def __call__(self, q, k, v, window: Window, scale: float | None = None) -> torch.Tensor:
        while True:
            kernel = self.kernel
            try:
                return kernel(q, k, v, window, scale)
            except _OUT_OF_MEMORY:
                raise
            except Exception as e:
                if kernel.name == "reference":
                    raise
                disable(kernel, _describe(e))
                with self._lock:
                    self.kernel = checked_kernel(window, q, self.preference).kernel


__all__ = [
    "AUTO", "DISABLED", "KERNELS", "FailSafeKernel", "WindowKernel", "checked_kernel", "kernel_names", "select_kernel",
    "usable_kernel",
]
