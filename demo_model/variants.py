"""The pack's three demo models behind one interface, so the trainer, the benchmarks, the nodes and
the tests treat them alike:

- ``digits``: the 64-token SD3/MMDiT demo (``data.py``), the fastest smoke test;
- ``image``: SD3/MMDiT (ComfyUI's class) on 128x128 canvases with four-fold rotational symmetry,
  32x32 latent = 256 image tokens (``scenes.py``);
- ``video``: Wan 2.1 t2v (ComfyUI's ``WanModel``), 4 latent frames of 16x16 = 4 x 8x8 tokens, a
  digit moving in a class-dependent direction (``scenes.py``).

Every model is loaded by ComfyUI's own loader (``comfy.sd.load_diffusion_model``), which detects it
from its keys; ComfyUI is imported inside the functions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import (
    CLASS_EMBEDDINGS_FILE,
    CLASSIFIER_FILE,
    DIFFUSION_MODELS_DIR,
    DIT_FILE,
    RECORD_FILE,
    WEIGHTS_DIR,
    data,
    scenes,
)

#: Sampler settings every demo model is evaluated with (the model's own shift applies: SD3 3, Wan 8).
STEPS = 20
CFG = 6.0
SAMPLER = "euler"
SCHEDULER = "simple"


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    family: str  # ComfyUI's model class, as the loader detects it
    dit_file: Path
    weights_dir: Path
    latent_shape: tuple[int, ...]  # one latent, as the empty-latent node gives it
    shift: float  # the model's sampling shift (ComfyUI's default for the family)
    image_size: int  # the classifier's input side
    frames: int  # 1 for images
    tokens: int  # image tokens
    grid: tuple[int, int, int]  # (frames, rows, columns) of tokens
    empty_latent_node: str  # how a graph makes the latent
    empty_latent_size: dict = field(default_factory=dict)

    @property
    def class_embeddings_file(self) -> Path:
        return CLASS_EMBEDDINGS_FILE if self.name == "digits" else self.weights_dir / "class_embeddings.safetensors"

    @property
    def classifier_file(self) -> Path:
        return CLASSIFIER_FILE if self.name == "digits" else self.weights_dir / "classifier.safetensors"

    @property
    def record_file(self) -> Path:
        return RECORD_FILE if self.name == "digits" else self.weights_dir / "training_record.json"

    # -- data ------------------------------------------------------------------------------------
    def random_batch(self, digits, labels, size: int, generator: torch.Generator):
        if self.name == "digits":
            return data.random_batch(digits, labels, size, generator)
        if self.name == "image":
            return scenes.random_canvases(digits, labels, size, generator)
        return scenes.random_clips(digits, labels, size, generator)

    def real_set(self, digits, labels, per_digit: int | None = None, seed: int = 0):
        """A split as real samples: every digit at every shift (digits); at ``per_digit`` random
        offsets of the 9 (image, default 3: all of them would be 1 GB); at every start jitter
        (video, 9) or at ``per_digit`` random ones."""
        if self.name == "digits":
            return data.every_shift(digits, labels)
        if self.name == "image":
            return scenes.every_canvas(digits, labels, per_digit=per_digit or 3, seed=seed)
        return scenes.every_clip(digits, labels, per_digit=per_digit, seed=seed)

    def structure_error(self, images: torch.Tensor) -> torch.Tensor:
        """The long-range structure's error per sample (0 for real data): mirror symmetry (digits),
        rotational symmetry (image), frame-to-frame motion (video)."""
        if self.name == "digits":
            return data.symmetry_error(images)
        if self.name == "image":
            return scenes.rotation_error(images)
        return scenes.motion_error(images)

    def to_model_latent(self, images: torch.Tensor) -> torch.Tensor:
        return scenes.image_to_model_latent(images)

    # -- ComfyUI ---------------------------------------------------------------------------------
    def latent_format(self):
        import comfy.latent_formats

        return comfy.latent_formats.Wan21() if self.name == "video" else comfy.latent_formats.SD3()

    def empty_latent(self, batch: int) -> dict:
        return {"samples": torch.zeros(batch, *self.latent_shape)}

    def latent_to_image(self, samples: torch.Tensor) -> torch.Tensor:
        """LATENT samples -> images (B, 1, H, W) or clips (B, T, 1, H, W) in [0, 1]."""
        return scenes.model_latent_to_image(self.latent_format().process_in(samples.float()))

    def load(self, path: str | Path | None = None):
        import comfy.sd

        return comfy.sd.load_diffusion_model(str(path or self.dit_file))

    def load_embeddings(self):
        from .conditioning import load_class_embeddings

        return load_class_embeddings(self.class_embeddings_file)

    def load_classifier(self):
        from .classifier import load_classifier

        return load_classifier(self.classifier_file)

    def sample(self, model, embeddings, labels: Sequence[int], seed: int, *, steps: int = STEPS, cfg: float = CFG,
               sampler: str = SAMPLER, scheduler: str = SCHEDULER) -> torch.Tensor:
        """One core KSampler run, one class per latent, the null class as the negative."""
        import nodes

        from .conditioning import NULL, class_conditioning

        positive = class_conditioning(embeddings, labels)
        negative = class_conditioning(embeddings, [NULL] * len(labels))
        (out,) = nodes.KSampler().sample(model, seed, steps, cfg, sampler, scheduler, positive, negative,
                                         self.empty_latent(len(labels)))
        return out["samples"]

    def new_classifier(self):
        from .classifier import DigitClassifier

        return DigitClassifier(image_size=self.image_size, in_channels=self.frames)


VARIANTS = {
    "digits": Variant("digits", "SD3/MMDiT depth 2, 64 image tokens (8x8), mirror-symmetric digits", "SD3",
                      DIT_FILE, WEIGHTS_DIR, (16, 16, 16), 3.0, 64, 1, 64, (1, 8, 8), "EmptySD3LatentImage",
                      {"width": 128, "height": 128}),
    "image": Variant("image", "SD3/MMDiT depth 2, 256 image tokens (16x16), rotation-symmetric digit canvases",
                     "SD3", DIFFUSION_MODELS_DIR / "ditfastattn_demo_image_mmdit.safetensors", WEIGHTS_DIR / "image",
                     (16, 32, 32), 3.0, scenes.CANVAS, 1, 256, (1, 16, 16), "EmptySD3LatentImage",
                     {"width": 256, "height": 256}),
    "video": Variant("video", "Wan 2.1 t2v, 2 layers, 4 frames x 8x8 tokens, a digit moving by class", "WAN21",
                     DIFFUSION_MODELS_DIR / "ditfastattn_demo_video_wan.safetensors", WEIGHTS_DIR / "video",
                     (16, scenes.FRAMES, 16, 16), 8.0, scenes.FRAME, scenes.FRAMES, 256, (scenes.FRAMES, 8, 8),
                     "EmptyHunyuanLatentVideo", {"width": 128, "height": 128, "length": 13}),
}


def variant(name: str) -> Variant:
    return VARIANTS[name]


# -- training-time model construction (ComfyUI's own classes) ------------------------------------

IMAGE_DEPTH = 2
VIDEO_DIM, VIDEO_FFN, VIDEO_LAYERS = 128, 512, 2
WAN_TEXT_DIM = 4096  # ComfyUI's WanModel default; its detector does not read text_dim from the keys


def image_unet_config() -> dict:
    from .conditioning import CONTEXT_DIM, POOLED_DIM

    side = scenes.CANVAS // data.BLOCK // 2
    return {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": IMAGE_DEPTH, "input_size": None,
            "adm_in_channels": POOLED_DIM,
            "context_embedder_config": {"target": "torch.nn.Linear",
                                        "params": {"in_features": CONTEXT_DIM, "out_features": 64 * IMAGE_DEPTH}},
            "num_patches": side * side, "pos_embed_max_size": side, "pos_embed_scaling_factor": None,
            "x_block_self_attn_layers": []}


def video_unet_config() -> dict:
    return {"image_model": "wan2.1", "model_type": "t2v", "dim": VIDEO_DIM, "out_dim": 16,
            "num_heads": VIDEO_DIM // 128, "ffn_dim": VIDEO_FFN, "num_layers": VIDEO_LAYERS, "patch_size": (1, 2, 2),
            "freq_dim": 256, "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6,
            "in_dim": 16}


def _init_everything(module: torch.nn.Module) -> None:
    """ComfyUI's layers skip their initialisation (weights are loaded): give every parameter a
    deterministic start (xavier linear/conv weights, zero biases, unit norm scales)."""
    done = set()
    for m in module.modules():
        w, b = getattr(m, "weight", None), getattr(m, "bias", None)
        if isinstance(w, torch.nn.Parameter):
            if w.dim() >= 2:
                torch.nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            else:
                torch.nn.init.ones_(w)
            done.add(id(w))
        if isinstance(b, torch.nn.Parameter):
            torch.nn.init.zeros_(b)
            done.add(id(b))
    for name, p in module.named_parameters():
        if id(p) not in done:
            if name.endswith("modulation"):
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape) / p.shape[-1] ** 0.5)
            else:
                raise RuntimeError(f"no initialisation for {name}")


def build_video_dit() -> torch.nn.Module:
    """ComfyUI's WanModel (through ``comfy.supported_models.WAN21_T2V``), initialised as Wan does
    (xavier, small-normal text/time embeddings, zero output)."""
    import comfy.supported_models

    config = comfy.supported_models.WAN21_T2V(video_unet_config())
    config.set_inference_dtype(torch.float32, None)
    dit = config.get_model({}).diffusion_model
    _init_everything(dit)
    for seq in (dit.text_embedding, dit.time_embedding):
        for m in seq:
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.normal_(m.weight, std=0.02)
    torch.nn.init.zeros_(dit.head.head.weight)
    return dit


def dit_forward(name: str) -> Callable:
    """``f(dit, x, timesteps, context, pooled)`` for the model's diffusion_model."""
    if name == "video":
        return lambda dit, x, t, context, pooled: dit(x, t, context)
    return lambda dit, x, t, context, pooled: dit(x, t, context=context, y=pooled)
