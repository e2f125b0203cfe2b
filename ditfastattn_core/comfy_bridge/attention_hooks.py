"""Where attention calls enter the engine: the chained attention override (every family whose
attention sees transformer_options) and attention-module patches (PixArt, whose attention
never does)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .families import PIXART_MODULES, Geometry, UnsupportedModelError
from .run import CALL_KEY, CallSlot, ModelCall


def _chain(previous: Callable | None, func: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
    if previous is not None:
        return previous(func, *args, **kwargs)
    return func(*args, **kwargs)


HONOURED_ARGUMENTS = frozenset({
    "transformer_options", "_inside_attn_wrapper", "attn_precision", "low_precision_attention", "small_input",
})
"""Keyword arguments of an attention call that do not change what it computes, or that the
dense path (which gets them) honours: the window kernels can compute the same attention."""


def unsupported_argument(kwargs: dict[str, Any], head_dim: int) -> str | None:
    """Why the engine cannot compute this call as the backend would, or None if it can.

    Newer ComfyUI passes ``scale`` (2026-05) and ``enable_gqa`` (2026-07, k and v with fewer
    heads); an argument this pack does not know may change the result too. Such calls pass
    through untouched rather than being windowed with other semantics."""
    for name, value in kwargs.items():
        if name in HONOURED_ARGUMENTS:
            continue
        if name == "enable_gqa" and not value:
            continue
        if name == "scale" and (value is None or math.isclose(float(value), head_dim ** -0.5, rel_tol=1e-6)):
            continue
        return f"{name}={value!r}" if name in ("enable_gqa", "scale") else f"the argument {name!r}"
    return None


def make_override(previous: Callable | None) -> Callable:
    """An optimized_attention_override that compresses image self-attention and hands
    everything else, and every dense computation, to ``previous`` (or the backend)."""

    def fastattn_override(func, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        call: ModelCall | None = options.get(CALL_KEY)
        if call is None:
            return _chain(previous, func, args, kwargs)
        q, k, v = args[:3]
        rest = dict(kwargs)
        skip_reshape = bool(rest.pop("skip_reshape", False))
        skip_output_reshape = bool(rest.pop("skip_output_reshape", False))
        heads = args[3] if len(args) > 3 else rest.pop("heads", None)
        rest.pop("heads", None)
        mask = args[4] if len(args) > 4 else rest.pop("mask", None)
        rest.pop("mask", None)
        if heads is None:
            heads = q.shape[1] if skip_reshape else 1
        head_dim = q.shape[-1] if skip_reshape else q.shape[-1] // heads
        unsupported = "a padding mask" if mask is not None else unsupported_argument(rest, head_dim)

        def dense(qh, kh, vh):
            return _chain(previous, func, (qh, kh, vh, heads),
                          {**rest, "skip_reshape": True, "skip_output_reshape": True})

        return call.attention(
            q, k, v, heads=heads, skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape,
            block=options, unsupported=unsupported, dense=dense, passthrough=lambda: _chain(previous, func, args, kwargs),
        )

    fastattn_override.ditfastattn = True
    fastattn_override.previous = previous
    return fastattn_override


def is_ours(override: Any) -> bool:
    return getattr(override, "ditfastattn", False)


# PixArt: attention module patches


def make_pixart_self_attention(module: torch.nn.Module, slot: CallSlot, block_index: int) -> Callable:
    """Forward of PixArt's AttentionKVCompress (the sr_ratio == 1 path, the only one PixArt
    models use) with its attention op routed through the engine. Calls outside a FastAttn
    model call, and masked calls, run the module's own forward."""
    from comfy.ldm.modules.attention import optimized_attention

    original = type(module).forward.__get__(module)
    heads = module.num_heads
    block = {"block_index": block_index}

    def dense(q, k, v):
        return optimized_attention(q, k, v, heads, skip_reshape=True, skip_output_reshape=True)

    def forward(x, mask=None, HW=None, block_id=None):
        call = slot.current
        if call is None or mask is not None:
            return original(x, mask=mask, HW=HW, block_id=block_id)
        b, n, c = x.shape
        q, k, v = module.qkv(x).reshape(b, n, 3, c).unbind(2)
        q, k = module.q_norm(q), module.k_norm(k)

        def as_module_does():  # the module's own attention op, bit for bit
            qh, kh, vh = (t.reshape(b, n, heads, c // heads).transpose(1, 2) for t in (q, k, v))
            return optimized_attention(qh, kh, vh, heads, mask=None, skip_reshape=True)

        out = call.attention(
            q, k, v, heads=heads, skip_reshape=False, skip_output_reshape=False, block=block, unsupported=None,
            dense=dense, passthrough=as_module_does,
        )
        return module.proj(out.view(b, n, c))

    return forward


def patch_pixart_attention(model: Any, geometry: Geometry, slot: CallSlot) -> None:
    """Object-patch the self-attention of each of PixArt's blocks on ``model`` (a clone)."""
    for i in range(geometry.layers):
        name = f"diffusion_model.blocks.{i}.attn"
        module = model.get_model_object(name)
        if getattr(module, "sr_ratio", 1) > 1:
            raise UnsupportedModelError("PixArt with KV compression (sr_ratio > 1) is not supported")
        model.add_object_patch(f"{name}.forward", make_pixart_self_attention(module, slot, i))


MODULE_PATCHERS: dict[str, Callable[[Any, Geometry, CallSlot], None]] = {PIXART_MODULES: patch_pixart_attention}
"""How families attached by module patches are patched, by ``Family.attach``."""
