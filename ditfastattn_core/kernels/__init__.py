"""Window-attention kernels and their selection by device, dtype and availability.

Every kernel computes the same function, ``Window.allowed``-masked softmax attention on
(B, H, L, D) tensors; they differ only in speed and in which windows they can express. A
kernel is never chosen for a window it cannot express.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

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


def usable_kernel(preference: str, device: torch.device | str) -> str:
    """``preference`` if it can run on ``device`` here, else "auto" with one warning line:
    a workflow made on a machine with flash-attn still runs on one without it."""
    if preference != AUTO and preference not in KERNELS:
        raise ValueError(f"unknown window kernel {preference!r}; choose one of {kernel_names()}")
    kernel = KERNELS.get(preference)
    if kernel is None:
        return AUTO
    if not kernel.available():
        reason = "it is not installed"
    elif preference == "flash" and torch.device(device).type != "cuda":
        reason = "flash-attn runs on CUDA only"
    else:
        return preference
    _warn_fallback(preference, reason)
    return AUTO


def select_kernel(window: Window, q: torch.Tensor, preference: str = AUTO) -> WindowKernel:
    """The kernel to run ``window`` on ``q``: the named one when it can, else (one warning
    line) the best available."""
    if preference != AUTO:
        kernel = KERNELS.get(preference)
        if kernel is None:
            raise ValueError(f"unknown window kernel {preference!r}; choose one of {kernel_names()}")
        reason = "it is not installed" if not kernel.available() else kernel.unsupported(window, q)
        if not reason:
            return kernel
        _warn_fallback(preference, reason)
    for name in _AUTO_ORDER.get(q.device.type, _AUTO_DEFAULT):
        kernel = KERNELS[name]
        if kernel.available() and kernel.unsupported(window, q) is None:
            return kernel
    return KERNELS["blocked"]


__all__ = ["AUTO", "KERNELS", "WindowKernel", "kernel_names", "select_kernel", "usable_kernel"]
