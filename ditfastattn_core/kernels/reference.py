"""Dense masked window attention: the definition every other kernel is tested against.

Quadratic memory in the sequence length, so it is never chosen automatically.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..window import Window


def reference_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: Window, scale: float | None = None
) -> torch.Tensor:
    mask = window.dense_mask(q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
