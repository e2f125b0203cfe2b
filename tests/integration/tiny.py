"""Tiny models of real ComfyUI DiT families, built on the CPU with random weights."""

from __future__ import annotations

import dataclasses
import importlib
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


def _fill_required_fields(unet_config: dict, params: str | None) -> dict:
    """Fields this tree's params dataclass requires but the config does not give take the value
    a missing feature has (an empty list, False or None: what model detection sets when the
    weights lack that feature), so one tiny config builds the same model on old and new trees."""
    if params is None:
        return unet_config
    module_name, _, class_name = params.rpartition(".")
    dataclass = getattr(importlib.import_module(module_name), class_name, None)
    if dataclass is None:
        return unet_config
    filled = dict(unet_config)
    for f in dataclasses.fields(dataclass):
        if f.name in filled or f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
            continue
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        filled[f.name] = [] if kind == "list" else False if kind == "bool" else None
    return filled


def _build(cls_name: str, unet_config: dict, params: str | None = None):
    import comfy.model_patcher
    import comfy.supported_models

    mc = getattr(comfy.supported_models, cls_name)(_fill_required_fields(unet_config, params))
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
    return Tiny("flux", _build("Flux", cfg, "comfy.ldm.flux.model.FluxParams"), torch.zeros(1, 16, 16, 24),
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


def _text(length, dim, seed, **extra):
    return _cond(length, dim, seed, **extra)


def _three(length_a, length_b, dim, **extra_fn):
    """positive, negative (same length: batched CFG), negative of another length (separate)."""
    def extra(seed, length):
        return {k: f(seed, length) for k, f in extra_fn.items()}
    return (_text(length_a, dim, 1, **extra(1, length_a)), _text(length_a, dim, 2, **extra(2, length_a)),
            _text(length_b, dim, 3, **extra(3, length_b)))


def pixart_alpha() -> Tiny:
    cfg = {"image_model": "pixart_alpha", "patch_size": 2, "num_heads": 2, "hidden_size": 96, "in_channels": 4,
           "depth": 2, "caption_channels": 32, "model_max_length": 16, "micro_condition": True}
    size = {"width": lambda s, n: 320, "height": lambda s, n: 256}
    return Tiny("pixart_alpha", _build("PixArtAlpha", cfg), torch.zeros(1, 4, 32, 40), *_three(8, 7, 32, **size))


def wan22() -> Tiny:
    cfg = {"image_model": "wan2.1", "model_type": "t2v", "dim": 64, "out_dim": 48, "num_heads": 2, "ffn_dim": 128,
           "num_layers": 2, "patch_size": (1, 2, 2), "freq_dim": 256, "window_size": (-1, -1), "qk_norm": True,
           "cross_attn_norm": True, "eps": 1e-6, "in_dim": 48, "text_dim": 32}
    return Tiny("wan22", _build("WAN22_T2V", cfg), torch.zeros(1, 48, 3, 8, 12), *_three(8, 7, 32))


def flux_kontext() -> Tiny:
    t = flux()
    ref = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(9))
    for conds in (t.positive, t.negative, t.negative_other_length):
        conds[0][1]["reference_latents"] = [ref]
    t.family = "flux_kontext"
    return t


def chroma() -> Tiny:
    cfg = {"image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": 32, "hidden_size": 64,
           "mlp_ratio": 2.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 2, "axes_dim": [8, 12, 12],
           "theta": 10000, "patch_size": 2, "qkv_bias": True, "in_dim": 64, "out_dim": 64, "hidden_dim": 64,
           "n_layers": 1}
    return Tiny("chroma", _build("Chroma", cfg, "comfy.ldm.chroma.model.ChromaParams"), torch.zeros(1, 16, 16, 24),
                *_three(8, 7, 32, pooled_output=lambda s, n: _pooled(32, s)))


def wan_i2v() -> Tiny:
    cfg = {"image_model": "wan2.1", "model_type": "i2v", "dim": 64, "out_dim": 16, "num_heads": 2, "ffn_dim": 128,
           "num_layers": 2, "patch_size": (1, 2, 2), "freq_dim": 256, "window_size": (-1, -1), "qk_norm": True,
           "cross_attn_norm": True, "eps": 1e-6, "in_dim": 36, "text_dim": 32}
    g = torch.Generator().manual_seed(7)
    concat = torch.randn(1, 16, 3, 8, 12, generator=g)
    mask = torch.ones(1, 1, 3, 8, 12)
    def extra(seed, length):
        return concat
    pos, neg, neg2 = _three(8, 7, 32, concat_latent_image=extra, concat_mask=lambda s, n: mask)
    return Tiny("wan_i2v", _build("WAN21_I2V", cfg), torch.zeros(1, 16, 3, 8, 12), pos, neg, neg2)


def hunyuan_video() -> Tiny:
    cfg = {"image_model": "hunyuan_video", "in_channels": 16, "out_channels": 16, "patch_size": [1, 2, 2],
           "vec_in_dim": 32, "axes_dim": [8, 12, 12], "meanflow": False, "context_in_dim": 32, "hidden_size": 64,
           "mlp_ratio": 2.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 2, "theta": 256, "qkv_bias": True,
           "byt5": False, "guidance_embed": True}
    return Tiny("hunyuan_video", _build("HunyuanVideo", cfg, "comfy.ldm.hunyuan_video.model.HunyuanVideoParams"), torch.zeros(1, 16, 3, 8, 12),
                *_three(8, 7, 32, pooled_output=lambda s, n: _pooled(32, s), guidance=lambda s, n: 6.0))


def ltxv() -> Tiny:
    cfg = {"image_model": "ltxv", "num_layers": 2, "attention_head_dim": 32, "num_attention_heads": 2,
           "cross_attention_dim": 64, "in_channels": 128, "caption_channels": 32}
    return Tiny("ltxv", _build("LTXV", cfg), torch.zeros(1, 128, 3, 4, 6),
                *_three(8, 7, 32, attention_mask=lambda s, n: torch.ones(1, n, dtype=torch.long),
                        frame_rate=lambda s, n: 25))


def lumina2() -> Tiny:
    cfg = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 64, "cap_feat_dim": 32, "n_layers": 2,
           "n_heads": 2, "n_kv_heads": 1, "qk_norm": True, "axes_dims": [8, 12, 12], "axes_lens": [300, 512, 512]}
    return Tiny("lumina2", _build("Lumina2", cfg), torch.zeros(1, 16, 16, 24),
                *_three(8, 7, 32, attention_mask=lambda s, n: torch.ones(1, n, dtype=torch.long)))


def qwen_image() -> Tiny:
    cfg = {"image_model": "qwen_image", "in_channels": 64, "out_channels": 16, "num_layers": 2,
           "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": 32, "axes_dims_rope": (8, 12, 12)}
    return Tiny("qwen_image", _build("QwenImage", cfg), torch.zeros(1, 16, 1, 16, 24), *_three(8, 7, 32))


def hidream() -> Tiny:
    cfg = {"image_model": "hidream", "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 2,
           "num_single_layers": 2, "attention_head_dim": 32, "num_attention_heads": 2, "caption_channels": [32, 48],
           "text_emb_dim": 32, "num_routed_experts": 4, "num_activated_experts": 2, "axes_dims_rope": [8, 12, 12],
           "max_resolution": [128, 128], "llama_layers": [0, 1, 2, 3]}
    def llama(seed, length):
        return torch.randn(1, 4, 5, 48, generator=torch.Generator().manual_seed(seed))
    return Tiny("hidream", _build("HiDream", cfg), torch.zeros(1, 16, 16, 24),
                *_three(8, 7, 32, pooled_output=lambda s, n: _pooled(32, s), conditioning_llama3=llama))


def cosmos_predict2() -> Tiny:
    cfg = {"image_model": "cosmos_predict2", "max_img_h": 240, "max_img_w": 240, "max_frames": 128, "in_channels": 16,
           "out_channels": 16, "patch_spatial": 2, "patch_temporal": 1, "model_channels": 64,
           "concat_padding_mask": True, "crossattn_emb_channels": 32, "pos_emb_cls": "rope3d",
           "pos_emb_learnable": True, "pos_emb_interpolation": "crop", "min_fps": 1, "max_fps": 30,
           "use_adaln_lora": True, "adaln_lora_dim": 32, "num_blocks": 2, "num_heads": 2,
           "extra_per_block_abs_pos_emb": False, "rope_h_extrapolation_ratio": 4.0,
           "rope_w_extrapolation_ratio": 4.0, "rope_t_extrapolation_ratio": 1.0, "extra_h_extrapolation_ratio": 1.0,
           "extra_w_extrapolation_ratio": 1.0, "extra_t_extrapolation_ratio": 1.0, "rope_enable_fps_modulation": False}
    return Tiny("cosmos_predict2", _build("CosmosT2IPredict2", cfg), torch.zeros(1, 16, 3, 8, 12), *_three(8, 7, 32))


def cosmos() -> Tiny:
    cfg = {"image_model": "cosmos", "max_img_h": 240, "max_img_w": 240, "max_frames": 128, "in_channels": 16,
           "out_channels": 16, "patch_spatial": 2, "patch_temporal": 1, "model_channels": 64,
           "block_config": "FA-CA-MLP", "concat_padding_mask": True, "pos_emb_cls": "rope3d",
           "pos_emb_learnable": False, "pos_emb_interpolation": "crop", "block_x_format": "THWBD",
           "affline_emb_norm": True, "use_adaln_lora": True, "adaln_lora_dim": 32, "num_blocks": 2, "num_heads": 2,
           "crossattn_emb_channels": 32, "extra_per_block_abs_pos_emb": True, "rope_h_extrapolation_ratio": 1.0,
           "rope_w_extrapolation_ratio": 1.0, "rope_t_extrapolation_ratio": 2.0,
           "extra_per_block_abs_pos_emb_type": "learnable"}
    return Tiny("cosmos", _build("CosmosT2V", cfg), torch.zeros(1, 16, 3, 8, 12), *_three(8, 7, 32))


BUILDERS = {
    "pixart": pixart, "pixart_alpha": pixart_alpha, "wan22": wan22, "flux": flux, "flux_kontext": flux_kontext, "chroma": chroma, "sd3": sd3, "wan": wan,
    "wan_i2v": wan_i2v, "hunyuan_video": hunyuan_video, "ltxv": ltxv, "lumina2": lumina2, "qwen_image": qwen_image,
    "hidream": hidream, "cosmos": cosmos, "cosmos_predict2": cosmos_predict2,
}
