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
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..window import Window
from .blocked import blocked_window_attention
from .flash import MAX_HEAD_DIM, SUPPORTED_DTYPES, flash_available, flash_window_attention
from .flex import flex_available, flex_window_attention
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
    )
}

_AUTO_ORDER = {"cuda": ("flash", "flex", "blocked")}
_AUTO_DEFAULT = ("blocked",)


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
    for name in _AUTO_ORDER.get(q.device.type, _AUTO_DEFAULT):
        kernel = KERNELS[name]
        if not _unusable(kernel) and kernel.unsupported(window, q) is None:
            return kernel
    return KERNELS["blocked"] if "blocked" not in DISABLED else KERNELS["reference"]


def _unusable(kernel: WindowKernel) -> str | None:
    if kernel.name in DISABLED:
        return f"it failed on this machine ({DISABLED[kernel.name]})"
    try:
        return None if kernel.available() else "it is not installed"
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
    a kernel that fails its check is disabled and the next one chosen."""
    while True:
        kernel = select_kernel(window, q, preference)
        if kernel.name == "reference":
            return FailSafeKernel(kernel, preference)
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
        if ok:
            return FailSafeKernel(kernel, preference)
        if kernel.name not in DISABLED:  # failed for this shape only: never again for it
            disable(kernel, "it failed its check on this machine")


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
