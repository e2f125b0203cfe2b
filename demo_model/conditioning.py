"""The demo model's class conditioning: a learned token sequence and pooled vector per class (what a
text encoder would produce for a prompt), plus a null entry for classifier-free guidance. The
embeddings were trained with the DiT and ship beside it (``weights/class_embeddings.safetensors``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from .data import NUM_CLASSES

NULL = NUM_CLASSES  # index of the unconditional embedding
CONTEXT_TOKENS = 4
CONTEXT_DIM = 32
POOLED_DIM = 32


class ClassEmbeddings(torch.nn.Module):
    """Rows 0..9 are the classes, row 10 is the null (unconditional) entry."""

    def __init__(self, context_dim: int = CONTEXT_DIM, pooled_dim: int | None = POOLED_DIM) -> None:
        super().__init__()
        self.context = torch.nn.Parameter(torch.randn(NUM_CLASSES + 1, CONTEXT_TOKENS, context_dim))
        # the video demo (Wan) has no pooled input: pooled_dim None
        self.pooled = torch.nn.Parameter(torch.randn(NUM_CLASSES + 1, pooled_dim)) if pooled_dim else None

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B,) labels in 0..10 -> context (B, 4, context_dim) and pooled (B, pooled_dim) or None."""
        return self.context[labels], None if self.pooled is None else self.pooled[labels]


def load_class_embeddings(path: str | Path) -> ClassEmbeddings:
    from safetensors.torch import load_file

    tensors = {k: v.float() for k, v in load_file(str(path)).items()}
    pooled = tensors.get("pooled")
    emb = ClassEmbeddings(tensors["context"].shape[-1], None if pooled is None else pooled.shape[-1])
    emb.load_state_dict(tensors)
    return emb.eval().requires_grad_(False)


def class_conditioning(embeddings: ClassEmbeddings, labels: Sequence[int]) -> list:
    """ComfyUI CONDITIONING with one row per label: a class (0..9) or the null entry (``NULL``).
    One label conditions every latent of a batch; one per latent conditions each its own."""
    bad = [label for label in labels if not 0 <= label <= NULL]
    if not labels or bad:
        raise ValueError(f"classes must be 0..{NUM_CLASSES - 1} (or {NULL} for the null entry), got {list(labels)}")
    with torch.no_grad():
        context, pooled = embeddings(torch.tensor(list(labels)))
    return [[context.clone(), {} if pooled is None else {"pooled_output": pooled.clone()}]]
