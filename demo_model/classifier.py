"""The digit classifier that judges the demo model's samples (class accuracy, Frechet distance on its
features). Trained on real composed images by ``train.py``."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .data import BLOCK, NUM_CLASSES

FEATURES = 128


class DigitClassifier(nn.Module):
    """A small CNN over the image averaged to the digits' native resolution (4x4 pixel blocks):
    ``features`` (B, 128) for Frechet distances, ``forward`` logits (B, 10)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(32 * 4 * 4, FEATURES)
        self.head = nn.Linear(FEATURES, NUM_CLASSES)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, 64, 64) images in [0, 1] -> (B, 128) penultimate activations."""
        x = F.avg_pool2d(images, BLOCK)
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self(images).argmax(dim=1)


def load_classifier(path: str | Path) -> DigitClassifier:
    from safetensors.torch import load_file

    model = DigitClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()
