"""Shared set-up of the ComfyUI benchmarks: import ComfyUI from $COMFYUI_PATH on the CPU with
PyTorch attention (the backend users get on GPUs), and build real architectures with random
weights (attention cost does not depend on the values)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def import_comfy(device: str = "cpu"):
    """``device``: "cpu", or "cuda" to let ComfyUI use its GPU (bench/gpu.py)."""
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        sys.exit("set COMFYUI_PATH to a ComfyUI tree (with its requirements installed) to run this benchmark")
    sys.path.insert(0, path)
    from comfy.cli_args import args

    args.cpu = device == "cpu"
    args.use_pytorch_cross_attention = True
    import comfy.model_management  # noqa: F401


def pixart_sigma_xl(depth: int):
    """PixArt-Sigma-XL's width (1152 hidden, 16 heads x 72, T5 text) at reduced depth."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    cfg = {"image_model": "pixart_sigma", "patch_size": 2, "num_heads": 16, "hidden_size": 1152,
           "in_channels": 4, "depth": depth, "caption_channels": 4096, "model_max_length": 300,
           "micro_condition": False, "pe_interpolation": 2.0}
    mc = comfy.supported_models.PixArtSigma(cfg)
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    load = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load, torch.device("cpu"))


def text_cond(seed: int, tokens: int = 120, dim: int = 4096):
    import torch

    return [[torch.randn(1, tokens, dim, generator=torch.Generator().manual_seed(seed)), {}]]
