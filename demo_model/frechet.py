"""The Frechet distance that judges the demo model's samples, in a feature space where a few hundred
samples estimate it.

The classifier's 128 penultimate ReLU features are a poor space for it: dozens of units never fire
on a digit and the rest are strongly correlated (10 classes), so a Gaussian fitted to 256 samples
has a singular covariance and the matrix square root in the distance is mostly estimation noise.
``FeatureSpace`` projects the features onto their leading principal components, fitted once on
the real training split (every training digit at every shift), where the covariance of 256
samples is well conditioned; ``frechet_distance`` is the usual distance between the two Gaussians.
"""

from __future__ import annotations

import torch

from .classifier import DigitClassifier

#: Principal components kept: they carry 98% of the real features' variance, and 256 samples
#: estimate a 16 x 16 covariance with 16 samples per parameter row.
COMPONENTS = 16


class FeatureSpace:
    """The classifier's features projected onto the top ``components`` principal axes of the real
    training-split features (centred on their mean)."""

    def __init__(self, classifier: DigitClassifier, real_images: torch.Tensor, components: int = COMPONENTS) -> None:
        self.classifier = classifier
        feats = self._features(real_images)
        self.mean = feats.mean(0)
        _, _, vh = torch.linalg.svd(feats - self.mean, full_matrices=False)
        self.axes = vh[:components].T  # (128, components)

    @torch.no_grad()
    def _features(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.classifier.features(chunk) for chunk in images.split(1024)]).double()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, 64, 64) images in [0, 1] -> (B, components) float64 coordinates."""
        return (self._features(images) - self.mean) @ self.axes


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between the Gaussians fitted to two (N, D) feature sets:
    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)``, with the square roots taken
    through symmetric eigendecompositions (exact for covariances, no complex round-off)."""
    a, b = a.double(), b.double()
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    vals, vecs = torch.linalg.eigh(cov_a)
    root_a = (vecs * vals.clamp_min(0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    mean_term = (a.mean(0) - b.mean(0)).square().sum()
    return float(mean_term + cov_a.trace() + cov_b.trace() - 2 * cross)
