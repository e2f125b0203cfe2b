"""The demo model through ComfyUI's own code: loading the file with ComfyUI's loader, sampling with
the core KSampler node, and turning a LATENT into images. ComfyUI is imported inside the functions
(its path must already be importable)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from . import DIT_FILE
from .conditioning import NULL, ClassEmbeddings, class_conditioning
from .data import LATENT, model_latent_to_image

#: Sampler settings the demo model was evaluated with (ComfyUI's SD3 default shift 3.0 applies).
STEPS = 20
CFG = 6.0
SAMPLER = "euler"
SCHEDULER = "simple"


def load_demo_dit(path: str | Path = DIT_FILE):
    """A ModelPatcher, exactly as "Load Diffusion Model" builds it (ComfyUI detects the SD3 sizes)."""
    import comfy.sd

    return comfy.sd.load_diffusion_model(str(path))


def empty_latent(batch: int) -> dict:
    """What "EmptySD3LatentImage" gives at 128x128: 16 channels, 16x16."""
    return {"samples": torch.zeros(batch, 16, LATENT, LATENT)}


def sample_classes(model, embeddings: ClassEmbeddings, labels: Sequence[int], seed: int, *,
                   steps: int = STEPS, cfg: float = CFG, sampler: str = SAMPLER,
                   scheduler: str = SCHEDULER) -> torch.Tensor:
    """One KSampler run (the core node) over a batch with one class per latent, the null class as
    the negative; returns the LATENT samples (B, 16, 16, 16)."""
    import nodes

    positive = class_conditioning(embeddings, labels)
    negative = class_conditioning(embeddings, [NULL] * len(labels))
    (out,) = nodes.KSampler().sample(model, seed, steps, cfg, sampler, scheduler, positive, negative,
                                     empty_latent(len(labels)))
    return out["samples"]


def latent_to_image(samples: torch.Tensor) -> torch.Tensor:
    """LATENT samples -> (B, 1, 64, 64) images in [0, 1], through SD3's latent format (the inverse of
    what KSampler applied on the way out)."""
    import comfy.latent_formats

    return model_latent_to_image(comfy.latent_formats.SD3().process_in(samples.float()))
