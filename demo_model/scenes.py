"""The data of the two larger demo models (``--model image`` and ``--model video``), built from the
same scikit-learn digits as the 64-token demo (``data.py``), at sizes where attention locality is
measurable.

**image** (256 image tokens, 16x16): a 128x128 canvas. One handwritten digit (4x upsampled to a
32x32 tile, 4x4 tokens) is placed in the middle of the top-left 64x64 quadrant, shifted by up to
one latent cell (4 pixels) either way (3x3 offsets, as the 64-token demo shifts its digit), and
the canvas is completed by its rotations about the centre by 90, 180 and 270 degrees (four-fold
rotational symmetry). Local detail: the strokes inside a token and the digit over its 4x4
tokens. Distant relations: every token has three partners at the rotated positions, up to 15
tokens away in both directions, and the digit's shape and shift must agree in all four
quadrants: a 1D band (+-32 tokens = 2 rows) or a small 2D box cannot see them. (A first recipe
with 5x5 offsets over the whole quadrant trained to a model that ignored its class in the same
time budget.)
``rotation_error`` (0 for real canvases) measures the long-range structure.

**video** (4 frames of 8x8 tokens, 256 tokens): 64x64 frames with one digit (32x32 tile) moving in
a straight line, one token (8 pixels) per frame, in a direction the class decides (36 degrees x
class), centred on the frame's middle with a start jitter of one latent cell (4 pixels) either
way. Local detail as above; the frames are linked by the motion (a token's content in frame t is
at a displaced position in frame t+1). ``motion_error`` (0 for real clips) measures whether the
frames are shifted copies of each other.

Both map to model-space latents exactly like ``data.py``: 16 channels = 4x4 pixel blocks in [-1, 1].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .data import BLOCK, DIGIT, TILE

CANVAS = 128  # image model: 128x128 pixels = 32x32 latent = 16x16 tokens at patch 2
OFFSETS = (12, 16, 20)  # the digit's offset in the quadrant, pixels: the middle +- one latent cell
FRAME = 64  # video model: 64x64 frames = 16x16 latent = 8x8 tokens at patch (1, 2, 2)
FRAMES = 4  # latent frames (Wan: 13 video frames -> 4 latent frames)
SPEED = 8  # pixels per frame = one token
JITTER = 4  # start jitter, pixels (one latent cell), either way


def _tiles(digits: torch.Tensor) -> torch.Tensor:
    """(B, 8, 8) -> (B, 1, 32, 32) bilinear 4x, as ``data.compose``."""
    assert digits.shape[-1] == DIGIT
    return F.interpolate(digits[:, None], size=(TILE, TILE), mode="bilinear", align_corners=False)


def compose_canvas(digits: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(B, 8, 8) digits and (B, 2) pixel offsets (rows, columns; from ``OFFSETS``) -> (B, 1, 128, 128)
    canvases with four-fold rotational symmetry."""
    tiles = _tiles(digits)
    canvas = torch.zeros(len(digits), 1, CANVAS, CANVAS)
    for i, (oy, ox) in enumerate(offsets.tolist()):
        canvas[i, :, oy:oy + TILE, ox:ox + TILE] = tiles[i]
    return sum(torch.rot90(canvas, k, dims=(-2, -1)) for k in range(4)).clamp(0.0, 1.0)


def random_canvases(digits, labels, size: int, generator: torch.Generator):
    idx = torch.randint(len(labels), (size,), generator=generator)
    offsets = torch.tensor(OFFSETS)[torch.randint(len(OFFSETS), (size, 2), generator=generator)]
    return compose_canvas(digits[idx], offsets), labels[idx]


def every_canvas(digits, labels, per_digit: int | None = None, seed: int = 0):
    """Each digit at ``per_digit`` offsets drawn with ``seed`` (all 9 if None): a split as canvases."""
    grid = torch.tensor([(oy, ox) for oy in OFFSETS for ox in OFFSETS])
    if per_digit is None:
        offsets = grid.repeat(len(labels), 1)
        return compose_canvas(digits.repeat_interleave(len(grid), 0), offsets), labels.repeat_interleave(len(grid))
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randint(len(grid), (len(labels) * per_digit,), generator=gen)
    return (compose_canvas(digits.repeat_interleave(per_digit, 0), grid[pick]),
            labels.repeat_interleave(per_digit))


def rotation_error(images: torch.Tensor) -> torch.Tensor:
    """Per-image mean |x - rot90(x)|: 0 for every real canvas."""
    return (images - torch.rot90(images, 1, dims=(-2, -1))).abs().mean(dim=(1, 2, 3))


def velocity(labels: torch.Tensor) -> torch.Tensor:
    """(B,) classes -> (B, 2) pixels per frame (rows, columns), direction 36 degrees x class, rounded
    to whole latent cells (4 pixels)."""
    angle = labels.double() * (2 * math.pi / 10)
    v = torch.stack([-torch.sin(angle), torch.cos(angle)], dim=1) * SPEED
    return (torch.round(v / BLOCK) * BLOCK).long()


def compose_clip(digits: torch.Tensor, labels: torch.Tensor, jitter: torch.Tensor) -> torch.Tensor:
    """(B, 8, 8) digits, their classes and (B, 2) start jitters in pixels -> (B, FRAMES, 1, 64, 64)
    clips: the tile moves by ``velocity(labels)`` per frame, its path centred on the frame."""
    tiles = _tiles(digits)
    v = velocity(labels)
    clips = torch.zeros(len(digits), FRAMES, 1, FRAME, FRAME)
    centre = (FRAME - TILE) / 2
    for i in range(len(digits)):
        start = [round((centre - (FRAMES - 1) / 2 * int(v[i, a])) / BLOCK) * BLOCK + int(jitter[i, a])
                 for a in (0, 1)]
        for t in range(FRAMES):
            y, x = start[0] + t * int(v[i, 0]), start[1] + t * int(v[i, 1])
            clips[i, t, :, y:y + TILE, x:x + TILE] = tiles[i]
    return clips


def random_clips(digits, labels, size: int, generator: torch.Generator):
    idx = torch.randint(len(labels), (size,), generator=generator)
    jitter = torch.randint(-1, 2, (size, 2), generator=generator) * JITTER
    return compose_clip(digits[idx], labels[idx], jitter), labels[idx]


def every_clip(digits, labels, per_digit: int | None = None, seed: int = 0):
    """Each digit at each of the 9 start jitters (or at ``per_digit`` of them drawn with ``seed``):
    a split as clips."""
    grid = torch.tensor([(dy, dx) for dy in (-JITTER, 0, JITTER) for dx in (-JITTER, 0, JITTER)])
    if per_digit is None:
        d, y = digits.repeat_interleave(len(grid), 0), labels.repeat_interleave(len(grid))
        return compose_clip(d, y, grid.repeat(len(labels), 1)), y
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randint(len(grid), (len(labels) * per_digit,), generator=gen)
    d, y = digits.repeat_interleave(per_digit, 0), labels.repeat_interleave(per_digit)
    return compose_clip(d, y, grid[pick]), y


def motion_error(clips: torch.Tensor) -> torch.Tensor:
    """Per-clip mean |frame t+1 - frame t shifted by the best whole-cell displacement| over the
    clip: 0 when every frame is a shifted copy of the one before (real clips)."""
    b, t = clips.shape[:2]
    errs = []
    for k in range(t - 1):
        a, nxt = clips[:, k], clips[:, k + 1]
        best = None
        for dy in range(-3 * BLOCK, 3 * BLOCK + 1, BLOCK):
            for dx in range(-3 * BLOCK, 3 * BLOCK + 1, BLOCK):
                e = (torch.roll(a, (dy, dx), dims=(-2, -1)) - nxt).abs().mean(dim=(1, 2, 3))
                best = e if best is None else torch.minimum(best, e)
        errs.append(best)
    return torch.stack(errs, 1).mean(1)


def image_to_model_latent(images: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) images or (B, T, 1, H, W) clips in [0, 1] -> model-space latents (B, 16, H/4, W/4)
    or (B, 16, T, H/4, W/4) in [-1, 1]."""
    if images.dim() == 4:
        return F.pixel_unshuffle(images * 2.0 - 1.0, BLOCK)
    b, t = images.shape[:2]
    lat = F.pixel_unshuffle(images.flatten(0, 1) * 2.0 - 1.0, BLOCK)
    return lat.unflatten(0, (b, t)).movedim(1, 2)


def model_latent_to_image(latents: torch.Tensor) -> torch.Tensor:
    """The inverse of ``image_to_model_latent`` (clamped to [0, 1])."""
    if latents.dim() == 4:
        return ((F.pixel_shuffle(latents, BLOCK) + 1.0) / 2.0).clamp(0.0, 1.0)
    b, _, t = latents.shape[:3]
    frames = F.pixel_shuffle(latents.movedim(2, 1).flatten(0, 1), BLOCK)
    return ((frames.unflatten(0, (b, t)) + 1.0) / 2.0).clamp(0.0, 1.0)
