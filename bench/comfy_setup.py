"""Shared set-up of the ComfyUI benchmarks: import ComfyUI ($COMFYUI_PATH, or the ComfyUI the pack
is installed in) on the CPU with PyTorch attention (the backend users get on GPUs), load the pack
with ComfyUI's own custom-node loader, and build real architectures with random weights (attention
cost does not depend on the values)."""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def comfyui_above(*starts: Path) -> Path | None:
    """The ComfyUI tree the pack is installed in (<ComfyUI>/custom_nodes/<pack>), found above
    any of ``starts`` (a path as given, for a symlinked pack, and the pack's real folder)."""
    for start in starts:
        for parent in start.parents:
            if (parent / "comfy").is_dir() and (parent / "nodes.py").is_file() and (parent / "main.py").is_file():
                return parent
    return None


def find_comfyui() -> Path:
    """$COMFYUI_PATH, else the ComfyUI tree above the pack: above the script's path as given
    (a symlinked pack) or above the pack's real folder."""
    path = os.environ.get("COMFYUI_PATH")
    if path:
        return Path(path)
    found = comfyui_above(Path(os.path.abspath(sys.argv[0])), ROOT)
    if found is None:
        sys.exit("no ComfyUI found above the pack: set COMFYUI_PATH to a ComfyUI tree (with its requirements installed)")
    return found


def import_comfy(device: str = "cpu") -> Path:
    """Make ComfyUI importable (PyTorch attention) and return its tree. ``device``: "cpu",
    or "cuda" to let ComfyUI use its GPU (bench/gpu.py)."""
    path = find_comfyui()
    sys.path.insert(0, str(path))
    from comfy.cli_args import args

    args.cpu = device == "cpu"
    args.use_pytorch_cross_attention = True
    import comfy.model_management  # noqa: F401

    return path


def load_pack() -> dict:
    """The pack's node classes by id, loaded by ComfyUI's own custom-node loader."""
    import nodes

    link = Path(tempfile.mkdtemp()) / "comfyui-ditfastattn"
    os.symlink(ROOT, link)
    if not asyncio.run(nodes.load_custom_node(str(link))):
        raise SystemExit("ComfyUI refused to load the pack")
    return {k: v for k, v in nodes.NODE_CLASS_MAPPINGS.items() if k.startswith("DiTFastAttn_")}


def pixart_sigma_xl(depth: int):
    """PixArt-Sigma-XL's width (1152 hidden, 16 heads x 72, T5 text) at reduced depth."""
    import comfy.supported_models

    cfg = {"image_model": "pixart_sigma", "patch_size": 2, "num_heads": 16, "hidden_size": 1152,
           "in_channels": 4, "depth": depth, "caption_channels": 4096, "model_max_length": 300,
           "micro_condition": False, "pe_interpolation": 2.0}
    return random_weights(comfy.supported_models.PixArtSigma(cfg))


def random_weights(model_config, buffers: tuple[str, ...] = ()):
    """A ModelPatcher of ``model_config``'s model in fp32 with N(0, 0.02) weights (seed 0), and
    the named buffers too (speed does not depend on the values)."""
    import comfy.model_management
    import comfy.model_patcher
    import torch

    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in [*model.parameters(), *(model.get_buffer(name) for name in buffers)]:
            t.copy_(torch.randn(t.shape, generator=g) * 0.02)
    return comfy.model_patcher.ModelPatcher(model, comfy.model_management.get_torch_device(), torch.device("cpu"))


def text_cond(seed: int, tokens: int = 120, dim: int = 4096):
    import torch

    return [[torch.randn(1, tokens, dim, generator=torch.Generator().manual_seed(seed)), {}]]
