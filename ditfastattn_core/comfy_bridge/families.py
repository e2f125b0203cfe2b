"""What the pack knows about each DiT family ComfyUI runs (ComfyUI 0.3.64 and later).

For each family: how many compressible self-attention layers one model call has (from the
model's own config, so a plan can be checked before sampling), how the image token grid
follows from the latent, and where the image tokens sit in a joint text+image sequence.

A call is compressible self-attention when q and k have the same length and hold the image
tokens (joint attention: plus global text/reference tokens). Text refiners (shorter than the
image) and cross-attention (k is the text) are never touched.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..window import TokenLayout

TEXT_FIRST = "text_first"
IMAGE_FIRST = "image_first"
IMAGE_ONLY = "image_only"


class UnsupportedModelError(ValueError):
    """The model is not a DiT family this pack can compress."""


@dataclass(frozen=True)
class Family:
    name: str
    order: str
    """Token order of joint attention: TEXT_FIRST, IMAGE_FIRST or IMAGE_ONLY."""
    count_layers: Callable[[dict[str, Any]], int]
    patch: tuple[int, ...] = (2, 2)
    """Patch size over the latent's trailing axes: (h, w) or (t, h, w)."""
    text_from_context: bool = True
    """Text length = the conditioning's token count (else: whatever precedes the image)."""
    joint_only: bool = False
    """Only joint text+image calls are layers (Lumina2: its image-only noise refiner always
    runs with a padding mask and stays untouched)."""
    patched_modules: bool = False
    """True where attention never sees transformer_options (PixArt): attention modules are
    object-patched instead of using the attention override."""

    def grid(self, latent_shape: tuple[int, ...]) -> tuple[int, ...]:
        spatial = tuple(latent_shape[2:])
        if len(spatial) == 3 and len(self.patch) == 2:
            if spatial[0] != 1:
                raise ValueError(f"{self.name} expects one latent frame, got {spatial[0]}")
            spatial = spatial[1:]
        if len(spatial) != len(self.patch):
            raise ValueError(f"{self.name}: latent of shape {latent_shape} does not fit patch {self.patch}")
        return tuple(-(-s // p) for s, p in zip(spatial, self.patch, strict=True))

    def token_layout(self, seq_len: int, grid: tuple[int, ...], text_len: int | None) -> TokenLayout | None:
        """Where the image tokens are in a self-attention call of ``seq_len`` tokens; None if
        this call is not over the image tokens (a text refiner)."""
        n = math.prod(grid)
        if seq_len < n:
            return None
        if seq_len == n and self.joint_only:
            return None
        if seq_len == n or self.order == IMAGE_ONLY:
            return TokenLayout(seq_len=seq_len, image_start=0, grid=grid) if seq_len == n else None
        if self.order == IMAGE_FIRST:
            return TokenLayout(seq_len=seq_len, image_start=0, grid=grid)
        start = text_len if (self.text_from_context and text_len is not None) else seq_len - n
        if start + n > seq_len:
            return None
        return TokenLayout(seq_len=seq_len, image_start=start, grid=grid)


def _get(cfg: dict[str, Any], key: str, default: Any = None) -> Any:
    value = cfg.get(key, default)
    if value is None:
        raise UnsupportedModelError(f"model config has no {key!r}")
    return value


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("pixart", IMAGE_ONLY, lambda c: _get(c, "depth", 28), patched_modules=True),
        Family("flux", TEXT_FIRST, lambda c: _get(c, "depth") + _get(c, "depth_single_blocks")),
        Family("chroma", TEXT_FIRST, lambda c: _get(c, "depth") + _get(c, "depth_single_blocks")),
        Family("chroma_radiance", TEXT_FIRST, lambda c: _get(c, "depth") + _get(c, "depth_single_blocks"),
               patch=(16, 16)),
        Family("sd3", TEXT_FIRST,
               lambda c: _get(c, "depth") + len(c.get("x_block_self_attn_layers") or [])),
        Family("wan", IMAGE_ONLY, lambda c: _get(c, "num_layers"), patch=(1, 2, 2)),
        Family("hunyuan_video", IMAGE_FIRST, lambda c: _get(c, "depth") + _get(c, "depth_single_blocks"),
               patch=(1, 2, 2)),
        Family("ltxv", IMAGE_ONLY, lambda c: _get(c, "num_layers"), patch=(1, 1, 1)),
        Family("lumina2", TEXT_FIRST, lambda c: _get(c, "n_layers"), text_from_context=False, joint_only=True),
        Family("qwen_image", TEXT_FIRST, lambda c: _get(c, "num_layers")),
        Family("hidream", IMAGE_FIRST, lambda c: _get(c, "num_layers") + _get(c, "num_single_layers")),
        Family("cosmos", IMAGE_ONLY, lambda c: _get(c, "num_blocks"), patch=(1, 2, 2)),
    )
}

# ComfyUI's model_base class name -> family. Subclasses (I2V variants etc.) resolve through
# their MRO, so new variants of a known family work without an entry here.
_BY_MODEL_CLASS = {
    "PixArt": "pixart",
    "Flux": "flux",
    "Chroma": "chroma",
    "ChromaRadiance": "chroma_radiance",
    "SD3": "sd3",
    "WAN21": "wan",
    "WAN22": "wan",
    "HunyuanVideo": "hunyuan_video",
    "LTXV": "ltxv",
    "Lumina2": "lumina2",
    "QwenImage": "qwen_image",
    "HiDream": "hidream",
    "CosmosVideo": "cosmos",
    "CosmosPredict2": "cosmos",
}


def detect_family(base_model: Any) -> Family:
    """The family of a ComfyUI ``model_base.BaseModel`` instance."""
    for cls in type(base_model).__mro__:
        name = _BY_MODEL_CLASS.get(cls.__name__)
        if name:
            return FAMILIES[name]
    supported = ", ".join(sorted(FAMILIES))
    raise UnsupportedModelError(
        f"{type(base_model).__name__} is not a diffusion transformer this pack supports "
        f"(supported: {supported}); connect a DiT model to Apply FastAttn"
    )


def layer_count(base_model: Any, family: Family) -> int:
    cfg = getattr(getattr(base_model, "model_config", None), "unet_config", None) or {}
    return int(family.count_layers(cfg))
