"""What the pack knows about each DiT family ComfyUI runs: one ``Family`` entry per family.

A family entry is the one place that says, for the models it covers:
- which ComfyUI model classes it is (exact ``model_base`` class names: a subclass with other
  geometry, such as Flux.2 under Flux, is never taken for its parent);
- its geometry, read from the model's own config (patch size, layer counts), so a plan is
  checked before sampling;
- where the image tokens sit in its attention calls (token order, text length);
- how its layers are keyed: by ``block_type`` / ``block_index`` from transformer_options where
  the model sets them (ComfyUI 2026), else by call order within a model call;
- how the pack attaches to it: the attention override, or attention-module patches where the
  attention never sees transformer_options (PixArt).

``resolve(model)`` detects the family once and returns a ``Geometry``: the resolved, immutable
facts for that model, which everything downstream uses.

A call is compressible self-attention when q and k have the same length and hold the image
tokens (joint attention: plus global text/reference tokens). Text refiners (shorter than the
image) and cross-attention (k is the text) are never touched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..window import FAMILY_WINDOWS, TokenLayout

TEXT_FIRST = "text_first"
"""[text, image, extra]: the image starts after the conditioning's text tokens."""
IMAGE_FIRST = "image_first"
"""[image, text/extra]: the image starts at 0."""
IMAGE_LAST = "image_last"
"""[text/extra, image]: the image is the last tokens."""
IMAGE_ONLY = "image_only"
"""Self-attention over the image tokens alone."""

OVERRIDE = "override"
"""Attached through ComfyUI's optimized_attention_override (attention sees transformer_options)."""


@dataclass(frozen=True)
class ModulePatches:
    """Attached by object-patching each layer's attention module, for models whose attention
    never sees transformer_options. ``module`` names the module type whose forward the pack
    reproduces around the engine (``attention_hooks.MODULE_FORWARDS``)."""

    path: str
    """The module of layer ``index`` in the ModelPatcher, e.g. "diffusion_model.blocks.{index}.attn"."""
    module: str


PIXART_MODULES = ModulePatches("diffusion_model.blocks.{index}.attn", "AttentionKVCompress")
"""PixArt's self-attention modules."""


class UnsupportedModelError(ValueError):
    """The model is not a DiT family this pack can compress."""


class UnplaceableCall(ValueError):
    """A model call whose image self-attention cannot be told from its other attention calls, or
    whose image tokens are not the latent's grid: all its calls run FULL (explained once, by key)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Blocks:
    """A run of compressible layers: ``count(unet_config)`` blocks that ComfyUI marks with
    ``block_type`` (None where it sets only ``block_index``)."""

    block_type: str | None
    count: Callable[[Mapping[str, Any]], int]


def _key(name: str, default: Any = None) -> Callable[[Mapping[str, Any]], Any]:
    def read(cfg: Mapping[str, Any]) -> Any:
        value = cfg.get(name, default)
        if value is None:
            raise UnsupportedModelError(f"model config has no {name!r}")
        return value

    return read


PatchReader = Callable[[Mapping[str, Any], Any], tuple[int, ...]]


def _square_patch(key: str = "patch_size", default: int = 2) -> PatchReader:
    """A square patch from the unet config (the class default where detection leaves it out)."""
    def read(cfg: Mapping[str, Any], diffusion_model: Any) -> tuple[int, ...]:
        p = int(_key(key, default)(cfg))
        return (p, p)

    return read


def _listed_patch(key: str = "patch_size", default: tuple[int, ...] = (1, 2, 2)) -> PatchReader:
    def read(cfg: Mapping[str, Any], diffusion_model: Any) -> tuple[int, ...]:
        return tuple(int(p) for p in _key(key, default)(cfg))

    return read


def _model_patch(attribute: str = "patch_size") -> PatchReader:
    """A square patch the model class fixes itself (no config key): read off the module."""
    def read(cfg: Mapping[str, Any], diffusion_model: Any) -> tuple[int, ...]:
        p = getattr(diffusion_model, attribute, None)
        if p is None:
            raise UnsupportedModelError(f"the diffusion model has no {attribute!r}")
        return (int(p), int(p))

    return read


def _cosmos_patch(cfg: Mapping[str, Any], diffusion_model: Any) -> tuple[int, ...]:
    return (int(_key("patch_temporal", 1)(cfg)),) + (int(_key("patch_spatial", 2)(cfg)),) * 2


def _fixed(order: str) -> Callable[[Any], str]:
    return lambda diffusion_model: order


LatentShape = Callable[[tuple[int, ...], Mapping[str, Any]], tuple[int, ...]]
CallCheck = Callable[[int, int | None, Mapping[str, Any]], None]


def _own_shape(x_shape: tuple[int, ...], conds: Mapping[str, Any]) -> tuple[int, ...]:
    return x_shape


def _first_packed_latent(x_shape: tuple[int, ...], conds: Mapping[str, Any]) -> tuple[int, ...]:
    """LTX-2 packs its video and audio latents into one x and passes their shapes as
    ``latent_shapes`` (model_base unpacks them); the video latent is the first."""
    shapes = conds.get("latent_shapes")
    return tuple(shapes[0]) if shapes else x_shape


def _placeable(tokens: int, text_len: int | None, conds: Mapping[str, Any]) -> None:
    return None


def _text_not_as_long_as_image(tokens: int, text_len: int | None, conds: Mapping[str, Any]) -> None:
    """Image-only families with a separate text cross-attention, where a tree marks no blocks:
    a layer's self-attention is its call with q and k both the image's length, which holds only
    while the text does not have that length too."""
    if text_len == tokens:
        raise UnplaceableCall("text_length", (
            f"the image has as many tokens as the text ({tokens}), so its self-attention cannot be told "
            "from its text cross-attention: those model calls run FULL (change the size by one latent "
            "frame or row to compress them)"))


def _ltx_check(tokens: int, text_len: int | None, conds: Mapping[str, Any]) -> None:
    """LTX models mark no blocks: a layer's video self-attention is its call with q and k both
    the video's length. That holds only while no other sequence of the call has that length,
    and while the video tokens are the latent's grid."""
    guides = conds.get("keyframe_idxs")
    if guides is not None and guides.shape[2] > 0:
        raise UnplaceableCall("ltx_guides", (
            "LTX keyframe guides (LTXVAddGuide) append guide tokens at the keyframes' positions and drop "
            "masked ones, so the video tokens are not the latent's grid: model calls with guides run FULL"))
    _text_not_as_long_as_image(tokens, text_len, conds)


def _ltx2_check(tokens: int, text_len: int | None, conds: Mapping[str, Any]) -> None:
    """As LTXV, and the audio (one token per audio latent frame, after any reference audio)
    must not have the video's length either: audio self-attention and the audio-video
    cross-attentions would look like video self-attention."""
    _ltx_check(tokens, text_len, conds)
    audio = sum(int(shape[2]) for shape in (conds.get("latent_shapes") or ())[1:])
    reference = conds.get("ref_audio")
    if reference is not None:
        audio += int(reference["tokens"].shape[1])
    if audio == tokens:
        raise UnplaceableCall("ltx2_audio_length", (
            f"the audio has as many tokens as the video ({tokens}), so LTX-2's video self-attention "
            "cannot be told from its audio attention calls: those model calls run FULL (change the "
            "video size or the audio length to compress them)"))


def _hunyuan_order(diffusion_model: Any) -> str:
    """HunyuanVideo's double blocks put the image first (``flipped_img_txt``) in ComfyUI before
    2026-02; since then its joint sequence is [text, byt5/vision, reference, image]."""
    blocks = getattr(diffusion_model, "double_blocks", None)
    first = blocks[0] if blocks is not None and len(blocks) else None
    return IMAGE_FIRST if getattr(first, "flipped_img_txt", False) else IMAGE_LAST


@dataclass(frozen=True)
class Family:
    name: str
    """The id stored in plans: a plan applies only to a model of the same family."""
    label: str
    model_classes: tuple[str, ...]
    """Exact ComfyUI ``model_base`` class names this entry covers (vetted, never by inheritance)."""
    blocks: tuple[Blocks, ...]
    """The compressible layers in call order; a plan's layer index runs over them."""
    patch: PatchReader
    """Patch size over the latent's trailing axes, (h, w) or (t, h, w), from the unet config
    (or, where the model class fixes it, from the diffusion model)."""
    order: Callable[[Any], str] = _fixed(TEXT_FIRST)
    """Token order of its self-attention calls, from the diffusion model (it changed over time)."""
    text_from_context: bool = True
    """Text length = the conditioning's token count (else: whatever the order leaves)."""
    joint_only: bool = False
    """Only joint text+image calls are layers (Lumina2: its image-only noise refiner always
    runs with a padding mask and stays untouched)."""
    attach: str | ModulePatches = OVERRIDE
    """How the pack attaches: ``OVERRIDE`` or the ``ModulePatches`` to make."""
    config_classes: tuple[str, ...] = ()
    """Where one model class holds several families (Lumina 2 and Z-Image): the ComfyUI
    ``supported_models`` config classes this entry covers."""
    pad_multiple: Callable[[Any], int] = lambda diffusion_model: 1
    """The image segment is padded to a multiple of this many tokens (Z-Image)."""
    since: str = "0.3.64"
    """The oldest ComfyUI this pack supports the family on (where older trees cannot be
    reached safely)."""
    keyed: bool = False
    """Every compressible call carries ``block_index`` on every ComfyUI the family is supported
    on, so a call without one is not a layer (Z-Image's refiners, text refiners)."""
    latent_shape: LatentShape = _own_shape
    """The image latent's shape in a model call, from x's shape and the call's conditioning
    (LTX-2 packs its video and audio latents into one x)."""
    check_call: CallCheck = _placeable
    """Raises ``UnplaceableCall`` for a model call (image token count, text length, conditioning)
    whose image self-attention cannot be placed safely."""
    window: str | None = None
    """The window preset Calibrate's family default stands for on this family (None: the one for
    its token grid, ``window.FAMILY_WINDOWS``, from the window study)."""

    def covers(self, base_model: Any) -> bool:
        if type(base_model).__name__ not in self.model_classes:
            return False
        config = type(getattr(base_model, "model_config", None)).__name__
        return not self.config_classes or config in self.config_classes

    def resolve(self, base_model: Any) -> Geometry:
        cfg = getattr(getattr(base_model, "model_config", None), "unet_config", None) or {}
        diffusion_model = getattr(base_model, "diffusion_model", None)
        counts = [int(b.count(cfg)) for b in self.blocks]
        offsets: dict[str | None, int] = {}
        start = 0
        for b, n in zip(self.blocks, counts, strict=True):
            offsets[b.block_type] = start
            start += n
        patch = self.patch(cfg, diffusion_model)
        return Geometry(
            family=self.name, label=self.label, layers=start, patch=patch,
            order=self.order(diffusion_model), text_from_context=self.text_from_context,
            joint_only=self.joint_only, attach=self.attach, block_offsets=offsets,
            pad_multiple=int(self.pad_multiple(diffusion_model)), keyed=self.keyed,
            latent_shape=self.latent_shape, check_call=self.check_call,
            window=self.window or FAMILY_WINDOWS[len(patch)],
        )


@dataclass(frozen=True)
class Geometry:
    """One model's resolved attention geometry: detected once, before sampling, and carried
    (immutable) by the patched model's options into every run and call."""

    family: str
    label: str
    layers: int
    patch: tuple[int, ...]
    order: str
    text_from_context: bool
    joint_only: bool
    attach: str | ModulePatches
    block_offsets: Mapping[str | None, int] = field(default_factory=dict)
    pad_multiple: int = 1
    keyed: bool = False
    latent_shape: LatentShape = _own_shape
    check_call: CallCheck = _placeable
    window: str = "band 1/8 (paper)"
    """The window preset Calibrate's family default stands for (``Family.window``)."""

    def call_grid(self, x_shape: tuple[int, ...], text_len: int | None, conds: Mapping[str, Any]) -> tuple[int, ...]:
        """The image token grid of one model call (x and its conditioning kwargs); raises
        ``UnplaceableCall`` (or ValueError) where its image self-attention cannot be placed."""
        grid = self.grid(self.latent_shape(x_shape, conds))
        self.check_call(math.prod(grid), text_len, conds)
        return grid

    def grid(self, latent_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The image token grid of a latent (B, C, [T,] H, W)."""
        spatial = tuple(latent_shape[2:])
        if len(spatial) == 2 and len(self.patch) == 3:
            spatial = (1, *spatial)  # an image through a video model: one frame
        if len(spatial) == 3 and len(self.patch) == 2:
            if spatial[0] != 1:
                raise ValueError(f"{self.label} expects one latent frame, got {spatial[0]}")
            spatial = spatial[1:]
        if len(spatial) != len(self.patch):
            raise ValueError(f"{self.label}: latent of shape {latent_shape} does not fit patch {self.patch}")
        return tuple(-(-s // p) for s, p in zip(spatial, self.patch, strict=True))

    def token_layout(self, seq_len: int, grid: tuple[int, ...], text_len: int | None) -> TokenLayout | None:
        """Where the image tokens are in a self-attention call of ``seq_len`` tokens; None if
        this call is not over the image tokens (a text refiner, an image-only refiner)."""
        n = math.prod(grid)
        segment = -(-n // self.pad_multiple) * self.pad_multiple  # the image and its padding
        if seq_len < n or (self.joint_only and seq_len <= segment):
            return None  # a text refiner, or (joint_only) an image-only refiner
        if seq_len == n:
            return TokenLayout(seq_len=seq_len, image_start=0, grid=grid)
        if self.order == IMAGE_ONLY:
            return None
        if self.order == IMAGE_FIRST:
            start = 0
        elif self.order == IMAGE_LAST:
            start = seq_len - segment
        else:
            start = text_len if (self.text_from_context and text_len is not None) else seq_len - n
        if start + n > seq_len:
            return None
        return TokenLayout(seq_len=seq_len, image_start=start, grid=grid)

    def layer_of(self, options: Mapping[str, Any], call_order: int) -> int | None:
        """The plan layer of an image self-attention call, or None if it is not one of the
        family's compressible layers (e.g. a VACE block). Keyed by ``block_type`` /
        ``block_index`` where the model sets them, else by call order within the model call."""
        index = options.get("block_index")
        if index is None:
            return None if self.keyed else call_order
        offset = self.block_offsets.get(options.get("block_type"))
        if offset is None:
            return None
        return offset + int(index)


def _sum(*keys: str) -> Callable[[Mapping[str, Any]], int]:
    return lambda cfg: sum(int(_key(k)(cfg)) for k in keys)


_FLUX_BLOCKS = (Blocks("double", _key("depth")), Blocks("single", _key("depth_single_blocks")))


def _lumina_padding(diffusion_model: Any) -> int:
    return int(getattr(diffusion_model, "pad_tokens_multiple", None) or 1)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("pixart", "PixArt", ("PixArt",), (Blocks(None, _key("depth", 28)),), _square_patch(),
               order=_fixed(IMAGE_ONLY), attach=PIXART_MODULES),
        Family("flux", "Flux", ("Flux",), _FLUX_BLOCKS, _square_patch()),
        Family("flux2", "Flux.2", ("Flux2",), _FLUX_BLOCKS, _square_patch(default=1), since="0.29.0", keyed=True),
        Family("chroma", "Chroma", ("Chroma",), _FLUX_BLOCKS, _square_patch()),
        Family("chroma_radiance", "Chroma Radiance", ("ChromaRadiance",), _FLUX_BLOCKS, _square_patch(default=16)),
        Family("sd3", "SD3", ("SD3",),
               (Blocks(None, lambda c: int(_key("depth")(c)) + len(c.get("x_block_self_attn_layers") or [])),),
               _square_patch()),
        Family("wan", "Wan", ("WAN21", "WAN22", "WAN22_Animate"), (Blocks("double", _key("num_layers")),),
               _listed_patch(), order=_fixed(IMAGE_ONLY), check_call=_text_not_as_long_as_image),
        Family("wan_vace", "Wan VACE", ("WAN21_Vace",), (Blocks("double", _key("num_layers")),), _listed_patch(),
               order=_fixed(IMAGE_ONLY), since="0.29.0", keyed=True),
        Family("wan_s2v", "Wan 2.2 S2V", ("WAN22_S2V",), (Blocks("double", _key("num_layers")),), _listed_patch(),
               order=_fixed(IMAGE_FIRST), since="0.29.0", keyed=True),
        Family("hunyuan_video", "HunyuanVideo", ("HunyuanVideo", "HunyuanVideoI2V", "HunyuanVideoSkyreelsI2V"),
               _FLUX_BLOCKS, _listed_patch(), order=_hunyuan_order, text_from_context=False),
        Family("hunyuan_video15", "HunyuanVideo 1.5", ("HunyuanVideo15",), _FLUX_BLOCKS,
               _listed_patch(default=(1, 1, 1)), order=_hunyuan_order, text_from_context=False, since="0.29.0", keyed=True),
        Family("hunyuan_image21", "HunyuanImage 2.1", ("HunyuanImage21",), _FLUX_BLOCKS,
               _listed_patch(default=(1, 1)), order=_hunyuan_order, text_from_context=False),
        Family("kandinsky5", "Kandinsky 5", ("Kandinsky5", "Kandinsky5Image"),
               (Blocks("double", _key("num_visual_blocks")),), _listed_patch(), order=_fixed(IMAGE_ONLY),
               since="0.29.0", keyed=True),
        Family("ltxv", "LTXV", ("LTXV",), (Blocks(None, _key("num_layers")),), lambda c, m: (1, 1, 1),
               order=_fixed(IMAGE_ONLY), check_call=_ltx_check),
        Family("ltx2", "LTX-2", ("LTXAV",), (Blocks(None, _key("num_layers")),), lambda c, m: (1, 1, 1),
               order=_fixed(IMAGE_ONLY), since="0.29.0", latent_shape=_first_packed_latent, check_call=_ltx2_check),
        Family("lumina2", "Lumina 2", ("Lumina2",), (Blocks("double", _key("n_layers")),), _square_patch(),
               order=_fixed(IMAGE_LAST), joint_only=True, config_classes=("Lumina2",), pad_multiple=_lumina_padding),
        Family("z_image", "Z-Image", ("Lumina2",), (Blocks("double", _key("n_layers")),), _square_patch(),
               order=_fixed(IMAGE_LAST), joint_only=True, config_classes=("ZImage",), pad_multiple=_lumina_padding,
               since="0.29.0", keyed=True),
        Family("z_image_pixel", "Z-Image (pixel space)", ("ZImagePixelSpace",), (Blocks("double", _key("n_layers")),),
               _square_patch(), order=_fixed(IMAGE_LAST), joint_only=True, pad_multiple=_lumina_padding,
               since="0.29.0", keyed=True),
        Family("qwen_image", "Qwen-Image", ("QwenImage",), (Blocks("double", _key("num_layers")),), _square_patch()),
        Family("mage_flow", "MageFlow", ("MageFlow",), (Blocks("double", _key("num_layers")),), _model_patch(),
               since="0.29.0", keyed=True),
        Family("hidream", "HiDream", ("HiDream",),
               (Blocks(None, _sum("num_layers", "num_single_layers")),), _square_patch(), order=_fixed(IMAGE_FIRST)),
        Family("cosmos", "Cosmos", ("CosmosVideo", "CosmosPredict2"), (Blocks(None, _key("num_blocks")),),
               _cosmos_patch, order=_fixed(IMAGE_ONLY), check_call=_text_not_as_long_as_image),
        Family("anima", "Anima", ("Anima",), (Blocks(None, _key("num_blocks")),), _cosmos_patch,
               order=_fixed(IMAGE_ONLY), since="0.29.0", keyed=True),
    )
}

REFUSED: dict[str, str] = {
    "WAN21_CausalAR": "Wan CausalAR keeps a KV cache across calls, which window attention would corrupt",
    "HunyuanDiT": "HunyuanDiT's attention never sees transformer_options",
    "ErnieImage": "Ernie-Image's attention never sees transformer_options",
    "SeedVR2": "SeedVR2's attention never sees transformer_options",
}
"""Model classes known and refused, with the reason (a DiT the pack cannot reach safely)."""

def comfyui_version() -> tuple[int, ...] | None:
    """The running ComfyUI's version, or None outside ComfyUI."""
    try:
        import comfyui_version
    except ImportError:
        return None
    return _version(comfyui_version.__version__)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:3] if part.isdigit())


def detect_family(base_model: Any) -> Family:
    """The family of a ComfyUI ``model_base.BaseModel`` instance, by its exact class."""
    name = type(base_model).__name__
    if name in REFUSED:
        raise UnsupportedModelError(f"{name} is not supported: {REFUSED[name]}")
    family = next((f for f in FAMILIES.values() if f.covers(base_model)), None)
    if family is None:
        if any(name in f.model_classes for f in FAMILIES.values()):  # a known class, another variant
            name = f"{name} ({type(getattr(base_model, 'model_config', None)).__name__})"
        supported = ", ".join(sorted({f.label for f in FAMILIES.values()}))
        raise UnsupportedModelError(
            f"{name} is not a diffusion transformer this pack supports (its token layout is not "
            f"established; supported: {supported}); connect a supported DiT model to FastAttn"
        )
    running = comfyui_version()
    if running is not None and running < _version(family.since):
        raise UnsupportedModelError(
            f"{family.label} needs ComfyUI {family.since} or later for this pack (its attention calls "
            f"cannot be placed safely on {'.'.join(map(str, running))}): update ComfyUI"
        )
    return family


def resolve(base_model: Any) -> Geometry:
    """Detect the family of ``base_model`` once and resolve its geometry from its config."""
    return detect_family(base_model).resolve(base_model)


def layer_count(base_model: Any, family: Family) -> int:
    return family.resolve(base_model).layers
