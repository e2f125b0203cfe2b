"""FlexAttention with a block-sparse mask built from the window rule (torch >= 2.5).

The block mask depends only on the window and the sequence length, so it is built once per
geometry and device. On CUDA the kernel is torch.compile'd (compiled once per process and
then reused for every layer); elsewhere the eager implementation runs, which is exact but
slow: good for checking numerics, not for speed.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings

import torch

from ..window import Window


@functools.cache
def flex_available() -> bool:
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        return False
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 5)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=16)
def _block_mask(window: Window, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    seq = window.layout.seq_len

    def mask_mod(b, h, q_idx, kv_idx):
        return window.allowed(q_idx, kv_idx)

    return create_block_mask(mask_mod, None, None, seq, seq, device=device)


def flex_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: Window,
    scale: float | None = None,
    *,
    compiled: bool | None = None,
) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    if compiled is None:
        compiled = q.device.type == "cuda"
    if compiled:
        return _compiled_flex()(q, k, v, block_mask=_block_mask(window, str(q.device)), scale=scale)
    with warnings.catch_warnings():  # eager on purpose (numerics checks): torch's advice does not apply
        warnings.filterwarnings("ignore", message=".*flex_attention.*unfused.*")
        return flex_attention(q, k, v, block_mask=_block_mask(window, str(q.device)), scale=scale)
