"""comfy-kitchen's neighbourhood attention (``na3d``): border-shifted 2D and 3D windows.

comfy-kitchen is ComfyUI's own kernel library (a requirement of ComfyUI 0.8 and later); from
0.2.40 on it has NATTEN-style neighbourhood attention, eager on any device, fused on CUDA for
fp16/bf16 (head dim up to 64, Triton up to 128). Its window is exactly the pack's
border-shifted window (``WindowSpec(border="shift")``): per axis ``min(2r + 1, size)`` keys
around the query, shifted inwards at the borders. It has no global tokens, so it runs pure
image sequences only (image-only self-attention: PixArt, Wan), never arrow attention.

It is imported only when first asked for; an installed copy that cannot be imported (a
mismatched wheel) makes the kernel unusable with the reason, never an import error here.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

import torch

from ..window import Window

REQUIREMENT = "comfy-kitchen >= 0.2.40 (its na3d)"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class KitchenUnloadable(RuntimeError):
    """comfy_kitchen is installed but cannot be imported."""


@functools.cache
def _load() -> tuple[Callable[..., torch.Tensor] | None, str | None]:
    """(comfy_kitchen.na3d or None if absent or too old, why an installed copy failed to import)."""
    try:
        module = importlib.import_module("comfy_kitchen")
    except ModuleNotFoundError as e:
        if e.name == "comfy_kitchen":
            return None, None
        return None, f"{type(e).__name__}: {e}"
    except Exception as e:  # a broken install: its own imports or extension loading fail
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no message'}"
    na3d = getattr(module, "na3d", None)
    return (na3d if callable(na3d) else None), None


def kitchen_available() -> bool:
    """Whether comfy_kitchen with ``na3d`` imports here; raises (the kernel table reports it
    as "cannot be loaded") when an installed copy fails to import."""
    na3d, error = _load()
    if error is not None:
        raise KitchenUnloadable(error)
    return na3d is not None


def kitchen_unsupported(window: Window, q: torch.Tensor) -> str | None:
    """Why na3d cannot compute ``window``, or None: it has no global tokens and no tiles."""
    if not window.spec.shifted:
        return "comfy-kitchen's na2d/na3d computes only the border-shifted (NATTEN) neighbourhood"
    if window.spec.dims not in (2, 3):
        return "comfy-kitchen's neighbourhood attention is used for 2D and 3D windows only"
    if window.layout.num_global:
        return "comfy-kitchen's neighbourhood attention has no global (text) tokens: image-only sequences only"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"comfy-kitchen's na3d takes fp32, fp16 or bf16, got {q.dtype}"
    return None


def _kernel_size(window: Window) -> list[int]:
    """NATTEN kernel per (T, H, W) axis: ``2r + 1`` keys, at most the axis (2D: T = 1)."""
    sizes = [min(2 * r + 1, size) for r, size in zip(window.radius, window.grid, strict=True)]
    return [1] * (3 - len(sizes)) + sizes


def kitchen_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: Window, scale: float | None = None
) -> torch.Tensor:
    """Border-shifted window attention on (B, heads, L, D) tensors via comfy_kitchen.na3d."""
    reason = kitchen_unsupported(window, q)
    if reason is not None:
        raise ValueError(reason)
    na3d, error = _load()
    if na3d is None:
        raise KitchenUnloadable(error or f"needs {REQUIREMENT}")
    b, h, seq, d = q.shape
    if seq != window.layout.seq_len or k.shape[2] != seq:
        raise ValueError(f"sequence of {seq} tokens does not match the window's {window.layout.seq_len}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError("comfy-kitchen's na3d needs q, k and v of one shape")
    grid = (1,) * (3 - len(window.grid)) + window.grid

    def on_grid(t: torch.Tensor) -> torch.Tensor:  # (B, heads, L, D) -> (B, T, H, W, heads, D)
        return t.reshape(b, h, *grid, t.shape[-1]).permute(0, 2, 3, 4, 1, 5)

    out = na3d(on_grid(q), on_grid(k), on_grid(v), kernel_size=_kernel_size(window),
               is_causal=[False, False, False], scale=None if scale is None else float(scale))
    return out.permute(0, 4, 1, 2, 3, 5).reshape(b, h, seq, out.shape[-1])
