"""Calibration losses.

``relative_l1`` is the paper's whole-model output loss: the mean over all elements of
``|O - O'| / (max(|O|, |O'|) + eps)``, clipped to [0, 10]. The maximum is of the absolute
values (the reference code divides by a signed max, which goes negative and hides errors).

``relative_squared_error`` is the local error of one layer's attention output that the fast
calibration uses (DiTFastAttnV2's measure): ``||O - O'||^2 / ||O||^2``.
"""

from __future__ import annotations

import torch

EPS = 1e-6
CLIP = 10.0


def relative_l1(reference: torch.Tensor, output: torch.Tensor, eps: float = EPS, clip: float = CLIP) -> float:
    if reference.shape != output.shape:
        raise ValueError(f"loss needs equal shapes, got {tuple(reference.shape)} and {tuple(output.shape)}")
    ref, out = reference.float(), output.float()
    err = (ref - out).abs() / (torch.maximum(ref.abs(), out.abs()) + eps)
    return float(err.clamp(0.0, clip).mean())


def relative_squared_error(reference: torch.Tensor, output: torch.Tensor, eps: float = EPS) -> float:
    if reference.shape != output.shape:
        raise ValueError(f"loss needs equal shapes, got {tuple(reference.shape)} and {tuple(output.shape)}")
    ref, out = reference.float(), output.float()
    return float((ref - out).pow(2).sum() / (ref.pow(2).sum() + eps))
