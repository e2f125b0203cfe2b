"""Tiny models of real ComfyUI DiT families, built on the CPU with random weights."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import types
from dataclasses import dataclass

import pytest
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


def _fit_to_tree(unet_config: dict, params: str | None) -> dict:
    """One tiny config for old and new trees, where the model takes its config as a params
    dataclass: a field this tree's dataclass requires but the config does not give takes the
    value a missing feature has (an empty list, False or None: what model detection sets when
    the weights lack that feature), and a key this tree's dataclass does not know (a feature
    added later, such as Chroma Radiance's ``use_x0``) is left out."""
    if params is None:
        return unet_config
    module_name, _, class_name = params.rpartition(".")
    dataclass = getattr(importlib.import_module(module_name), class_name, None)
    if dataclass is None:
        return unet_config
    fields = {f.name: f for f in dataclasses.fields(dataclass)}
    fitted = {k: v for k, v in unet_config.items() if k in fields or k == "image_model"}
    for f in fields.values():
        if f.name in fitted or f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
            continue
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        fitted[f.name] = [] if kind == "list" else False if kind == "bool" else None
    return fitted


def _build(cls_name: str, unet_config: dict, params: str | None = None):
    import comfy.model_patcher
    import comfy.supported_models

    if not hasattr(comfy.supported_models, cls_name):
        import comfyui_version

        pytest.skip(f"ComfyUI {comfyui_version.__version__} has no {cls_name}")
    mc = getattr(comfy.supported_models, cls_name)(_fit_to_tree(unet_config, params))
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
    return _three_with(length_a, length_b, dim, lambda seed, length: {k: f(seed, length) for k, f in extra_fn.items()})


def _newer_than_this_tree(tiny: Tiny) -> Tiny:
    """Skip a model this tree has but the pack supports only on newer ComfyUI (the refusal
    itself is tested in test_refusals.py)."""
    from ditfastattn_core.comfy_bridge import UnsupportedModelError, resolve

    try:
        resolve(tiny.patcher.model)
    except UnsupportedModelError as e:
        pytest.skip(str(e))
    return tiny


def _three_with(length_a, length_b, dim, extra):
    """As ``_three``, with ``extra(seed, length)`` returning all extra conditioning keys at once."""
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


# ComfyUI 2026 families (0.29.0); on older trees their builders skip.


def flux2() -> Tiny:
    cfg = {"image_model": "flux2", "in_channels": 128, "out_channels": 128, "vec_in_dim": None,
           "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 3.0, "num_heads": 2, "depth": 2,
           "depth_single_blocks": 2, "axes_dim": [8, 8, 8, 8], "theta": 2000, "patch_size": 1, "qkv_bias": False,
           "guidance_embed": True, "txt_ids_dims": [3], "global_modulation": True, "mlp_silu_act": True,
           "ops_bias": False, "default_ref_method": "index", "ref_index_scale": 10.0}
    # text is left-padded to 512 tokens: only a longer negative runs in a separate call
    return Tiny("flux2", _build("Flux2", cfg), torch.zeros(1, 128, 6, 8),
                _cond(7, 32, 1, guidance=3.5), _cond(7, 32, 2, guidance=3.5), _cond(520, 32, 3, guidance=3.5))


def chroma_radiance() -> Tiny:
    cfg = {"image_model": "chroma_radiance", "in_channels": 3, "out_channels": 3, "context_in_dim": 32,
           "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 2,
           "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 8, "qkv_bias": True, "in_dim": 64, "out_dim": 64,
           "hidden_dim": 64, "n_layers": 1, "nerf_hidden_size": 16, "nerf_mlp_ratio": 2, "nerf_depth": 1,
           "nerf_max_freqs": 8, "nerf_tile_size": 0, "nerf_final_head_type": "linear",
           "nerf_embedder_dtype": torch.float32, "use_x0": False, "use_sequential_txt_ids": False}
    model = _build("ChromaRadiance", cfg, "comfy.ldm.chroma_radiance.model.ChromaRadianceParams")
    return Tiny("chroma_radiance", model, torch.zeros(1, 3, 48, 64),
                *_three(8, 7, 32, pooled_output=lambda s, n: None))


def _hunyuan_extra(byt5: bool, vision: bool):
    def extra(seed, length):
        g = torch.Generator().manual_seed(100 + seed)
        out = {"pooled_output": None}
        if byt5:
            out["conditioning_byt5small"] = torch.randn(1, 5, 1472, generator=g)
        if vision:
            out["clip_vision_output"] = types.SimpleNamespace(last_hidden_state=torch.randn(1, 4, 24, generator=g))
        return out
    return extra


def hunyuan_video15() -> Tiny:
    cfg = {"image_model": "hunyuan_video", "in_channels": 65, "out_channels": 32, "vec_in_dim": None,
           "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 2,
           "depth_single_blocks": 2, "axes_dim": [8, 12, 12], "theta": 256, "patch_size": [1, 1, 1],
           "qkv_bias": True, "guidance_embed": False, "byt5": True, "meanflow": False,
           "use_cond_type_embedding": True, "vision_in_dim": 24, "meanflow_sum": True}
    extra = _hunyuan_extra(byt5=True, vision=True)
    return Tiny("hunyuan_video15", _build("HunyuanVideo15", cfg), torch.zeros(1, 32, 3, 6, 8),
                *_three_with(8, 7, 32, extra))


def hunyuan_image21() -> Tiny:
    cfg = {"image_model": "hunyuan_video", "in_channels": 64, "out_channels": 64, "vec_in_dim": None,
           "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 2,
           "depth_single_blocks": 2, "axes_dim": [16, 16], "theta": 256, "patch_size": [1, 1], "qkv_bias": True,
           "guidance_embed": False, "byt5": True, "meanflow": False}
    model = _build("HunyuanImage21", cfg, "comfy.ldm.hunyuan_video.model.HunyuanVideoParams")
    return Tiny("hunyuan_image21", model, torch.zeros(1, 64, 6, 8),
                *_three_with(8, 7, 32, _hunyuan_extra(byt5=True, vision=False)))


def _kandinsky5(cls_name: str, visual_embed_dim: int, latent: torch.Tensor, rope_scale: tuple) -> Tiny:
    cfg = {"image_model": "kandinsky5", "in_visual_dim": 16, "out_visual_dim": 16, "in_text_dim": 32,
           "in_text_dim2": 32, "time_dim": 32, "model_dim": 64, "ff_dim": 128, "visual_embed_dim": visual_embed_dim,
           "patch_size": (1, 2, 2), "num_text_blocks": 2, "num_visual_blocks": 2, "axes_dims": (8, 12, 12),
           "rope_scale_factor": rope_scale}
    return Tiny(cls_name.lower(), _build(cls_name, cfg), latent,
                *_three(8, 7, 32, pooled_output=lambda s, n: _pooled(32, s)))


def kandinsky5() -> Tiny:  # video: noise 16 + image 16 + mask 1 channels, 2x2 patches
    return _kandinsky5("Kandinsky5", 132, torch.zeros(1, 16, 3, 8, 10), (1.0, 2.0, 2.0))


def kandinsky5_image() -> Tiny:
    return _kandinsky5("Kandinsky5Image", 64, torch.zeros(1, 16, 8, 10), (1.0, 1.0, 1.0))


def _z_image_config(**changes) -> dict:
    # Z-Image's modulation needs dim >= 256
    cfg = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 256, "n_layers": 2,
           "n_refiner_layers": 2, "n_heads": 2, "n_kv_heads": 2, "multiple_of": 16, "ffn_dim_multiplier": 8.0 / 3.0,
           "qk_norm": True, "cap_feat_dim": 32, "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512],
           "rope_theta": 256.0, "z_image_modulation": True, "time_scale": 1000.0, "pad_tokens_multiple": 32}
    return {**cfg, **changes}


def z_image() -> Tiny:
    return Tiny("z_image", _build("ZImage", _z_image_config()), torch.zeros(1, 16, 12, 10), *_three(7, 40, 32))


def z_image_edit() -> Tiny:
    """Z-Image omni/edit: a reference image (and its text) in front of the main image."""
    g = torch.Generator().manual_seed(5)
    ref, ref_text = torch.randn(1, 16, 8, 6, generator=g), torch.randn(1, 5, 32, generator=g)
    refs = {"reference_latents": lambda s, n: [ref], "reference_latents_text_embeds": lambda s, n: [ref_text]}
    return Tiny("z_image_edit", _build("ZImage", _z_image_config()), torch.zeros(1, 16, 12, 10),
                *_three(7, 40, 32, **refs))


def z_image_pixel() -> Tiny:
    cfg = _z_image_config(image_model="zimage_pixel", patch_size=4, in_channels=3, decoder_in_channels=48,
                          decoder_hidden_size=32, decoder_num_res_blocks=1, decoder_max_freqs=8)
    return Tiny("z_image_pixel", _build("ZImagePixelSpace", cfg), torch.zeros(1, 3, 24, 20), *_three(7, 40, 32))


def qwen_image_edit() -> Tiny:
    """Qwen-Image-Edit: reference latents appended after the image."""
    cfg = {"image_model": "qwen_image", "in_channels": 64, "out_channels": 16, "num_layers": 2,
           "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": 32,
           "axes_dims_rope": (8, 12, 12), "default_ref_method": "index"}
    g = torch.Generator().manual_seed(5)
    refs = [torch.randn(1, 16, 1, 8, 6, generator=g), torch.randn(1, 16, 1, 4, 4, generator=g)]
    import comfy.ldm.qwen_image.model as qwen_model

    # 0.3.64's Qwen-Image has no default_ref_method (it appends references all the same)
    if "default_ref_method" not in inspect.signature(qwen_model.QwenImageTransformer2DModel.__init__).parameters:
        cfg.pop("default_ref_method")
    return Tiny("qwen_image_edit", _build("QwenImage", cfg), torch.zeros(1, 16, 1, 12, 10),
                *_three(8, 7, 32, reference_latents=lambda s, n: refs))


def mage_flow() -> Tiny:
    cfg = {"image_model": "mage_flow", "in_channels": 128, "out_channels": 128, "num_layers": 2,
           "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": 32, "axes_dims_rope": (8, 12, 12)}
    return Tiny("mage_flow", _build("MageFlow", cfg), torch.zeros(1, 128, 6, 5), *_three(8, 7, 32))


def _wan_config(**changes) -> dict:
    cfg = {"image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "in_dim": 16, "dim": 64,
           "ffn_dim": 128, "freq_dim": 256, "text_dim": 32, "out_dim": 16, "num_heads": 2, "num_layers": 2,
           "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6}
    return {**cfg, **changes}


def wan_vace() -> Tiny:
    g = torch.Generator().manual_seed(4)
    streams = [torch.randn(1, 32, 3, 8, 6, generator=g) for _ in range(2)]
    model = _build("WAN21_Vace", _wan_config(model_type="vace", vace_layers=1, vace_in_dim=96))
    masks = [torch.ones(1, 64, 3, 8, 6)] * 2  # given, so a batch of several latents keeps batch-1 streams
    return _newer_than_this_tree(Tiny("wan_vace", model, torch.zeros(1, 16, 3, 8, 6), *_three(
        8, 7, 32, vace_frames=lambda s, n: streams, vace_mask=lambda s, n: masks,
        vace_strength=lambda s, n: [1.0, 0.5])))


def wan_s2v() -> Tiny:
    g = torch.Generator().manual_seed(4)
    ref, motion = torch.randn(1, 16, 1, 8, 8, generator=g), torch.randn(1, 16, 19, 8, 8, generator=g)
    model = _build("WAN22_S2V", _wan_config(model_type="s2v", audio_dim=32, num_audio_token=4, cond_dim=16,
                                            audio_inject_layers=[0, 1]))
    return _newer_than_this_tree(Tiny("wan_s2v", model, torch.zeros(1, 16, 3, 8, 8), *_three(
        8, 7, 32, reference_latents=lambda s, n: [ref], reference_motion=lambda s, n: motion)))


def wan_animate() -> Tiny:
    pose = torch.randn(1, 16, 2, 8, 6, generator=torch.Generator().manual_seed(4))
    model = _build("WAN22_Animate", _wan_config(model_type="animate", in_dim=36))
    return Tiny("wan_animate", model, torch.zeros(1, 16, 3, 8, 6), *_three(8, 7, 32, pose_video_latent=lambda s, n: pose))


def anima() -> Tiny:
    cfg = {"image_model": "anima", "max_img_h": 240, "max_img_w": 240, "max_frames": 128, "in_channels": 16,
           "out_channels": 16, "patch_spatial": 2, "patch_temporal": 1, "concat_padding_mask": True,
           "model_channels": 64, "num_blocks": 2, "num_heads": 2, "crossattn_emb_channels": 1024,
           "pos_emb_cls": "rope3d", "pos_emb_learnable": True, "pos_emb_interpolation": "crop", "min_fps": 1,
           "max_fps": 30, "use_adaln_lora": True, "adaln_lora_dim": 32}
    # without t5xxl_ids the LLM adapter is skipped and c_crossattn is used as it is
    return Tiny("anima", _build("Anima", cfg), torch.zeros(1, 16, 1, 12, 10), *_three(7, 11, 1024))


def ltx2() -> Tiny:
    """LTX-2 video without audio: a plain latent (B, 128, T, H, W), patch 1x1x1."""
    cfg = {"image_model": "ltxav", "num_layers": 2, "in_channels": 128, "audio_in_channels": 128,
           "cross_attention_dim": 64, "audio_cross_attention_dim": 32, "attention_head_dim": 32,
           "audio_attention_head_dim": 16, "num_attention_heads": 2, "audio_num_attention_heads": 2,
           "caption_channels": 64, "connector_attention_head_dim": 32, "connector_num_attention_heads": 2,
           "connector_num_layers": 1, "num_learnable_registers": 8}
    # raw caption features: the text connectors pad them with registers to 1024 tokens, so only a
    # negative over 1024 tokens runs in a separate call
    return Tiny("ltx2", _build("LTXAV", cfg), torch.zeros(1, 128, 3, 4, 6), _cond(7, 64, 1, frame_rate=25),
                _cond(7, 64, 2, frame_rate=25), _cond(1030, 64, 3, frame_rate=25))


def ltx2_av(audio_frames: int = 10) -> Tiny:
    """LTX-2 video with audio: a nested latent (video, audio (B, 8, frames, 16)) that the sampler
    packs into one x; one audio token per audio latent frame."""
    tiny = ltx2()  # skips on trees without LTX-2 (and nested latents)
    import comfy.nested_tensor

    tiny.latent = comfy.nested_tensor.NestedTensor((tiny.latent, torch.zeros(1, 8, audio_frames, 16)))
    return tiny


def is_nested(latent) -> bool:
    return getattr(latent, "is_nested", False)


def noise_like(latent, seed: int):
    """Gaussian noise shaped like a latent (each part of a nested one)."""
    g = torch.Generator().manual_seed(seed)
    if is_nested(latent):
        import comfy.nested_tensor

        return comfy.nested_tensor.NestedTensor([torch.randn(t.shape, generator=g) for t in latent.unbind()])
    return torch.randn(latent.shape, generator=g)


def repeat_batch(latent, n: int):
    """The latent repeated to a batch of n (each part of a nested one)."""
    def repeat(t):
        return t.repeat(n, *([1] * (t.dim() - 1)))
    if is_nested(latent):
        import comfy.nested_tensor

        return comfy.nested_tensor.NestedTensor([repeat(t) for t in latent.unbind()])
    return repeat(latent)


def flat(samples) -> torch.Tensor:
    """Sampled latents as one (B, ...) tensor (the parts of a nested one, packed)."""
    if is_nested(samples):
        return torch.cat([t.reshape(t.shape[0], -1) for t in samples.unbind()], dim=1)
    return samples


def with_counting_override(patcher):
    """A clone of ``patcher`` with another pack's attention override that counts its calls."""
    seen: list[int] = []

    def other(func, *args, **kwargs):
        seen.append(1)
        return func(*args, **kwargs)

    clone = patcher.clone()
    clone.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = other
    return clone, seen


BUILDERS = {
    "pixart": pixart, "pixart_alpha": pixart_alpha, "wan22": wan22, "flux": flux, "flux_kontext": flux_kontext, "chroma": chroma, "sd3": sd3, "wan": wan,
    "wan_i2v": wan_i2v, "hunyuan_video": hunyuan_video, "ltxv": ltxv, "lumina2": lumina2, "qwen_image": qwen_image,
    "hidream": hidream, "cosmos": cosmos, "cosmos_predict2": cosmos_predict2,
    "flux2": flux2, "chroma_radiance": chroma_radiance, "hunyuan_video15": hunyuan_video15,
    "hunyuan_image21": hunyuan_image21, "kandinsky5": kandinsky5, "kandinsky5_image": kandinsky5_image,
    "z_image": z_image, "z_image_edit": z_image_edit, "z_image_pixel": z_image_pixel,
    "qwen_image_edit": qwen_image_edit, "mage_flow": mage_flow, "wan_vace": wan_vace, "wan_s2v": wan_s2v,
    "wan_animate": wan_animate, "anima": anima, "ltx2": ltx2, "ltx2_av": ltx2_av,
}
