"""flash-attn's sliding window (``window_size=(w, w)``): CUDA, fp16/bf16, exact 1D band only.

flash-attn is optional and imported only when this kernel runs. The window is passed as
``(w, w)`` keys on each side: the reference code's ``(-w, w)`` means an unbounded left side.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from ..window import Window

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


@functools.cache
def flash_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def flash_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: Window, scale: float | None = None
) -> torch.Tensor:
    from flash_attn import flash_attn_func

    w = window.band_half_width
    if w is None:
        raise ValueError("flash-attn expresses only an exact 1D band over image tokens")
    out = flash_attn_func(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        softmax_scale=scale,
        causal=False,
        window_size=(w, w),
    )
    return out.transpose(1, 2)
