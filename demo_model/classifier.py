"""The digit classifier that judges the demo model's samples (class accuracy, Frechet distance on its
features). Trained on real composed images by ``train.py``."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .data import BLOCK, NUM_CLASSES

FEATURES = 128


class DigitClassifier(nn.Module):
    """A small CNN over the image averaged to the digits' native resolution (4x4 pixel blocks):
    ``features`` (B, 128) for Frechet distances, ``forward`` logits (B, 10)."""

    def __init__(self, image_size: int = 64, in_channels: int = 1) -> None:
        """``image_size`` 128 for the image demo's canvases; ``in_channels`` = frames for the video
        demo's clips (B, T, 1, H, W), whose frames become the channels."""
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        side = image_size // (BLOCK * 4)
        self.fc = nn.Linear(32 * side * side, FEATURES)
        self.head = nn.Linear(FEATURES, NUM_CLASSES)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, 64, 64) images (or (B, 1, 128, 128), (B, T, 1, 64, 64) as built) in [0, 1] -> (B, 128)
        penultimate activations."""
        if images.dim() == 5:
            images = images.flatten(1, 2)
        x = F.avg_pool2d(images, BLOCK)
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self(images).argmax(dim=1)


def load_classifier(path: str | Path) -> DigitClassifier:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    in_channels = tensors["conv.0.weight"].shape[1]
    side = math.isqrt(tensors["fc.weight"].shape[1] // 32)
    model = DigitClassifier(image_size=side * BLOCK * 4, in_channels=in_channels)
    model.load_state_dict(tensors)
    return model.eval()
