"""Nodes for the pack's demo models (demo_model/): the class conditioning that stands in for a text
encoder, and the latent-to-image step that stands in for a VAE. The DiTs themselves are loaded by
the core "Load Diffusion Model" node, which lists them once the pack is loaded: the 64-token
digits demo (SD3), the 256-token image demo (SD3) and the video demo (Wan 2.1)."""

from __future__ import annotations

import functools

import folder_paths
from comfy_api.latest import io

from ..demo_model import DIFFUSION_MODELS_DIR
from ..demo_model.conditioning import NULL, ClassEmbeddings, class_conditioning
from ..demo_model.data import NUM_CLASSES
from ..demo_model.variants import VARIANTS


def register() -> None:
    """List the demo DiT in "Load Diffusion Model" (folder_paths' diffusion_models)."""
    folder_paths.add_model_folder_path("diffusion_models", str(DIFFUSION_MODELS_DIR))


@functools.cache
def _embeddings(model: str = "digits") -> ClassEmbeddings:
    return VARIANTS[model].load_embeddings()


def demo_variant(model) -> str:
    """Which demo model a loaded ModelPatcher is (None: the digits demo), from what ComfyUI
    detected: Wan 2.1 is the video demo, SD3 with a 16x16 position table the image demo, SD3 with
    8x8 the digits demo; anything else is refused."""
    if model is None:
        return "digits"
    config = getattr(getattr(model, "model", None), "model_config", None)
    unet = getattr(config, "unet_config", {}) or {}
    kind = type(config).__name__
    if kind == "WAN21_T2V" and unet.get("dim") == 128:
        return "video"
    if kind == "SD3" and unet.get("depth") == 2:
        side = unet.get("pos_embed_max_size")
        for name, v in VARIANTS.items():
            if v.family == "SD3" and v.grid[1] == side:
                return name
    raise ValueError(f"FastAttn Demo Class is for the pack's demo DiTs (ditfastattn_demo_*); this model is "
                     f"{kind} {dict((k, unet.get(k)) for k in ('depth', 'dim', 'pos_embed_max_size'))}")


class DemoClassConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DiTFastAttn_DemoClassConditioning",
            display_name="FastAttn Demo Class",
            category="model_patches/ditfastattn/demo",
            description="Conditioning for the pack's demo DiTs: the learned embedding of a digit class as "
            "positive, the learned null embedding as negative (for CFG). model: digits = "
            "ditfastattn_demo_mmdit (64 tokens), image = ditfastattn_demo_image_mmdit (256 tokens), video = "
            "ditfastattn_demo_video_wan (Wan, 4 frames).",
            inputs=[io.Int.Input("digit", default=3, min=0, max=NUM_CLASSES - 1,
                                 tooltip="The class (digit 0-9) to generate."),
                    io.Model.Input("model", optional=True,
                                   tooltip="The demo DiT the conditioning is for (each has its own "
                                   "embeddings): connect Load Diffusion Model's output; unconnected, the "
                                   "64-token digits demo.")],
            outputs=[io.Conditioning.Output(display_name="positive"),
                     io.Conditioning.Output(display_name="negative")],
        )

    @classmethod
    def execute(cls, digit: int, model=None) -> io.NodeOutput:
        emb = _embeddings(demo_variant(model))
        return io.NodeOutput(class_conditioning(emb, [digit]), class_conditioning(emb, [NULL]))


class DemoLatentToImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DiTFastAttn_DemoLatentToImage",
            display_name="FastAttn Demo Latent to Image",
            category="model_patches/ditfastattn/demo",
            description="Decode a demo DiT's LATENT: its 16 channels are the image's 4x4 pixel blocks "
            "(no VAE). A 128x128 Empty SD3 Latent gives a 64x64 grayscale image, 256x256 a 128x128 one (the "
            "image demo); a video latent (the Wan demo) gives its frames, one image per frame.",
            inputs=[io.Latent.Input("samples")],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, samples: dict) -> io.NodeOutput:
        latent = samples["samples"]
        images = VARIANTS["video" if latent.dim() == 5 else "digits"].latent_to_image(latent)
        if images.dim() == 5:  # (B, T, 1, H, W) clips: every frame an image
            images = images.flatten(0, 1)
        return io.NodeOutput(images.movedim(1, -1).expand(-1, -1, -1, 3).contiguous())
