"""The demo data: handwritten digits (scikit-learn's 8x8 set) composed into 64x64 images with a
four-fold mirror symmetry, and the exact mapping between such an image and the model's latent.

Structure at three scales: stroke edges inside a token (bilinear upsampling), the digit's shape over
a 4x4-token tile, and the symmetry that ties each token to its mirror images up to 8 tokens away.
Window attention without its residual cannot see a token's mirror partners, so broken symmetry is
the visible sign of a window that lost long-range information (``symmetry_error`` measures it).

The latent is the image itself: ComfyUI's SD3 latent format maps a LATENT to model space, and in
model space the 16 channels are the image's 4x4 pixel blocks (space-to-depth), scaled to [-1, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NUM_CLASSES = 10
DIGIT = 8  # scikit-learn's digits are 8x8
TILE = 32  # a digit upsampled 4x
IMAGE = 2 * TILE  # 64x64, the digit and its three mirror images
BLOCK = 4  # pixels per latent cell side: 16 latent channels = 4x4 pixels
LATENT = IMAGE // BLOCK  # 16x16 latent (SD3 "128x128" empty latent), 8x8 tokens at patch size 2
MAX_SHIFT = 1  # random digit translation, in 8x8 pixels, before upsampling


def load_digits_split(test_fraction: float = 0.2, seed: int = 0):
    """scikit-learn's digits as float images in [0, 1], split into train and held-out test sets by a
    fixed permutation: returns (train_images, train_labels, test_images, test_labels)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = round(len(labels) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return images[train], labels[train], images[test], labels[test]


def compose(digits: torch.Tensor, shifts: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 8, 8) digits in [0, 1] -> (B, 1, 64, 64) images: each digit translated by ``shifts``
    ((B, 2) integers in [-MAX_SHIFT, MAX_SHIFT], rows then columns), upsampled 4x and mirrored into
    the four quadrants (the image is symmetric about both centre lines)."""
    if shifts is None:
        shifts = torch.zeros(len(digits), 2, dtype=torch.long)
    pad = MAX_SHIFT
    padded = F.pad(digits, (pad, pad, pad, pad))
    moved = torch.stack([
        p[pad - int(dy): pad - int(dy) + DIGIT, pad - int(dx): pad - int(dx) + DIGIT]
        for p, (dy, dx) in zip(padded, shifts, strict=True)
    ])
    tile = F.interpolate(moved[:, None], size=(TILE, TILE), mode="bilinear", align_corners=False)
    top = torch.cat([tile, tile.flip(-1)], dim=-1)
    return torch.cat([top, top.flip(-2)], dim=-2).clamp(0.0, 1.0)


def every_shift(digits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every digit composed at every shift in [-MAX_SHIFT, MAX_SHIFT]^2 (9 images per digit), and
    their labels: the whole of a split as images."""
    shifts = torch.tensor([(dy, dx) for dy in range(-MAX_SHIFT, MAX_SHIFT + 1)
                           for dx in range(-MAX_SHIFT, MAX_SHIFT + 1)])
    return (compose(digits.repeat_interleave(len(shifts), 0), shifts.repeat(len(labels), 1)),
            labels.repeat_interleave(len(shifts)))


def random_batch(digits: torch.Tensor, labels: torch.Tensor, size: int, generator: torch.Generator):
    """A batch of composed images (random digits, random shifts) and their labels."""
    idx = torch.randint(len(labels), (size,), generator=generator)
    shifts = torch.randint(-MAX_SHIFT, MAX_SHIFT + 1, (size, 2), generator=generator)
    return compose(digits[idx], shifts), labels[idx]


def image_to_model_latent(images: torch.Tensor) -> torch.Tensor:
    """(B, 1, 64, 64) images in [0, 1] -> (B, 16, 16, 16) model-space latents in [-1, 1]."""
    return F.pixel_unshuffle(images * 2.0 - 1.0, BLOCK)


def model_latent_to_image(latents: torch.Tensor) -> torch.Tensor:
    """(B, 16, h, w) model-space latents -> (B, 1, 4h, 4w) images in [0, 1] (inverse of
    ``image_to_model_latent``, clamped)."""
    return ((F.pixel_shuffle(latents, BLOCK) + 1.0) / 2.0).clamp(0.0, 1.0)


def symmetry_error(images: torch.Tensor) -> torch.Tensor:
    """Per-image mean |x - mirror(x)| over both mirror axes: 0 for every real image."""
    lr = (images - images.flip(-1)).abs().mean(dim=(1, 2, 3))
    ud = (images - images.flip(-2)).abs().mean(dim=(1, 2, 3))
    return (lr + ud) / 2
