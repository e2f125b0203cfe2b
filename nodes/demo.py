"""Nodes for the pack's demo model (demo_model/): the class conditioning that stands in for a text
encoder, and the latent-to-image step that stands in for a VAE. The DiT itself is loaded by the
core "Load Diffusion Model" node, which lists it once the pack is loaded."""

from __future__ import annotations

import functools

import folder_paths
from comfy_api.latest import io

from ..demo_model import CLASS_EMBEDDINGS_FILE, DIFFUSION_MODELS_DIR
from ..demo_model.comfy_io import latent_to_image
from ..demo_model.conditioning import NULL, ClassEmbeddings, class_conditioning, load_class_embeddings
from ..demo_model.data import NUM_CLASSES


def register() -> None:
    """List the demo DiT in "Load Diffusion Model" (folder_paths' diffusion_models)."""
    folder_paths.add_model_folder_path("diffusion_models", str(DIFFUSION_MODELS_DIR))


@functools.cache
def _embeddings() -> ClassEmbeddings:
    return load_class_embeddings(CLASS_EMBEDDINGS_FILE)


class DemoClassConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DiTFastAttn_DemoClassConditioning",
            display_name="FastAttn Demo Class",
            category="model_patches/ditfastattn/demo",
            description="Conditioning for the pack's demo DiT (ditfastattn_demo_mmdit): the learned "
            "embedding of a digit class as positive, the learned null embedding as negative (for CFG).",
            inputs=[io.Int.Input("digit", default=3, min=0, max=NUM_CLASSES - 1,
                                 tooltip="The class (digit 0-9) to generate.")],
            outputs=[io.Conditioning.Output(display_name="positive"),
                     io.Conditioning.Output(display_name="negative")],
        )

    @classmethod
    def execute(cls, digit: int) -> io.NodeOutput:
        emb = _embeddings()
        return io.NodeOutput(class_conditioning(emb, [digit]), class_conditioning(emb, [NULL]))


class DemoLatentToImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DiTFastAttn_DemoLatentToImage",
            display_name="FastAttn Demo Latent to Image",
            category="model_patches/ditfastattn/demo",
            description="Decode the demo DiT's LATENT: its 16 channels are the image's 4x4 pixel blocks "
            "(no VAE). A 128x128 Empty SD3 Latent gives a 64x64 grayscale image.",
            inputs=[io.Latent.Input("samples")],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, samples: dict) -> io.NodeOutput:
        images = latent_to_image(samples["samples"])  # (B, 1, H, W)
        return io.NodeOutput(images.movedim(1, -1).expand(-1, -1, -1, 3).contiguous())
