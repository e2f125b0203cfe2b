"""Tiny models of real ComfyUI DiT families, built on the CPU with random weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Tiny:
    family: str
    patcher: object
    latent: torch.Tensor
    positive: list
    negative: list
    negative_other_length: list
    """A negative whose text length cannot be batched with the positive: separate CFG calls."""


def _build(cls_name: str, unet_config: dict):
    import comfy.model_patcher
    import comfy.supported_models

    mc = getattr(comfy.supported_models, cls_name)(unet_config)
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        for name, b in model.named_buffers():
            if name == "diffusion_model.pos_embed":
                b.copy_(torch.randn(b.shape, generator=g) * 0.02)
    return comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))


def _cond(length: int, dim: int, seed: int, **extra):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, length, dim, generator=g), dict(extra)]]


def _pooled(dim: int, seed: int):
    return torch.randn(1, dim, generator=torch.Generator().manual_seed(seed))


def pixart() -> Tiny:
    cfg = {"image_model": "pixart_sigma", "patch_size": 2, "num_heads": 2, "hidden_size": 64, "in_channels": 4,
           "depth": 3, "caption_channels": 32, "model_max_length": 16, "micro_condition": False}
    return Tiny("pixart", _build("PixArtSigma", cfg), torch.zeros(1, 4, 32, 40),
                _cond(8, 32, 1), _cond(8, 32, 2), _cond(7, 32, 3))


def flux() -> Tiny:
    cfg = {"image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16, "vec_in_dim": 32,
           "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 2,
           "depth_single_blocks": 2, "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2, "qkv_bias": True}
    return Tiny("flux", _build("Flux", cfg), torch.zeros(1, 16, 16, 24),
                _cond(8, 32, 1, pooled_output=_pooled(32, 1)), _cond(8, 32, 2, pooled_output=_pooled(32, 2)),
                _cond(7, 32, 3, pooled_output=_pooled(32, 3)))


def sd3() -> Tiny:
    cfg = {"in_channels": 16, "pos_embed_scaling_factor": None, "patch_size": 2, "out_channels": 16, "depth": 2,
           "input_size": None, "adm_in_channels": 32, "qk_norm": "rms",
           "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 32, "out_features": 128}},
           "num_patches": 256, "pos_embed_max_size": 16, "x_block_self_attn_layers": [0]}
    return Tiny("sd3", _build("SD3", cfg), torch.zeros(1, 16, 16, 24),
                _cond(8, 32, 1, pooled_output=_pooled(32, 1)), _cond(8, 32, 2, pooled_output=_pooled(32, 2)),
                _cond(7, 32, 3, pooled_output=_pooled(32, 3)))


def wan() -> Tiny:
    cfg = {"image_model": "wan2.1", "model_type": "t2v", "dim": 64, "out_dim": 16, "num_heads": 2, "ffn_dim": 128,
           "num_layers": 2, "patch_size": (1, 2, 2), "freq_dim": 256, "window_size": (-1, -1), "qk_norm": True,
           "cross_attn_norm": True, "eps": 1e-6, "in_dim": 16, "text_dim": 32}
    return Tiny("wan", _build("WAN21_T2V", cfg), torch.zeros(1, 16, 3, 8, 12),
                _cond(8, 32, 1), _cond(8, 32, 2), _cond(7, 32, 3))


BUILDERS = {"pixart": pixart, "flux": flux, "sd3": sd3, "wan": wan}
