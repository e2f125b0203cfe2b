"""Where attention calls enter the engine, and which of them do.

Calls arrive through the chained attention override (every family whose attention sees
transformer_options) or attention-module patches (PixArt, whose attention never does); both
find the current model call in the ``CallSlot`` the APPLY_MODEL wrapper fills, and hand the
call to ``route_attention``, which decides whether it is a compressible layer.

Under torch.compile (ComfyUI's TorchCompileModel) both entries are ``torch.compiler.disable``d:
what they do depends on the step, the run's caches and per-run Python state, none of which a
compiled graph can hold or guard. The model's own code between attention calls stays compiled
(one graph break per attention call), and the hooks are the same objects from one run to the
next, so a sampling run reuses the graphs the first one compiled (``COMPILE_BOUNDARY``).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..context import CallContext
from ..engine import keep_module_output, reuse_module_output
from .attention_chain import DenseChain, holds_containers, peeked
from .families import OVERRIDE, Geometry, UnsupportedModelError
from .run import ModelCall

COMPILE_BOUNDARY = "FastAttn attention: per-step decisions and caches run eagerly"
"""The reason torch.compile reports for the graph break at each attention call the pack hooks."""


class CallSlot(threading.local):
    """The current model call, filled by the APPLY_MODEL wrapper and read by the override and
    the module patches: one per installed model, one value per thread (MultiGPU CFG Split runs
    model calls in parallel threads)."""

    def __init__(self) -> None:
        self.current: ModelCall | None = None


def place_call(
    call: ModelCall, rows: int, seq_q: int, seq_k: int, block: Mapping[str, Any], unsupported: str | None
) -> tuple[int, CallContext] | None:
    """The plan layer and engine context of an attention call of ``call`` over ``rows`` batch
    rows, or None where it runs as the model makes it: not image self-attention, not one of
    the family's compressible layers, an argument the engine cannot honour, a step off the
    schedule, or rows that are not the model call's (a wrapper split the batch).

    ``block`` carries the call's ``block_type`` / ``block_index`` where the model sets them
    (its transformer_options, or the patched module's own index)."""
    if seq_q != seq_k or call.grid is None or call.run.full_reason is not None:
        return None  # cross-attention, a call we cannot place, or a run that is FULL
    part = None
    if call.rows is not None and rows != call.rows:
        # a DIFFUSION_MODEL wrapper ran the model on part of the batch: raylight's CFG parallel
        # keeps one branch per rank but leaves cond_or_uncond listing both (``cfg_part`` says
        # which chunks this rank holds); where the branch of each row cannot be known, these
        # calls are not split into CFG chunks, not cached
        part = call.cfg_part(rows)
        if part is None:
            call.state.count("rows_unknown")
            call.run.report("rows", f"attention saw {rows} batch rows where its model call had {call.rows} (a "
                            "wrapper split the batch): which CFG branch each row is cannot be known, so those "
                            "calls ran FULL")
            return None
    ctx = call.context(seq_q, part)
    if ctx is None:
        return None  # text refiner
    run, geometry = call.run, call.run.geometry
    if call.site.replaced and block.get("block_index") is None:
        # blocks skipped in this call shift the count of attention calls: no safe layer
        call.state.count("replaced_blocks_full")
        run.report("replaced_unkeyed", f"{geometry.label} calls that replace or skip blocks "
                   f"({', '.join(call.site.replaced)}; e.g. skip-layer guidance) ran FULL: this model does not "
                   "name its blocks to attention, so their layers cannot be placed once blocks are skipped")
        return None
    layer = geometry.layer_of(block, call.layers_seen)
    call.layers_seen += 1
    if call.layers_seen == 1 and call.step is not None:
        # the call reached attention (a step cache such as EasyCache may skip the model inside
        # apply_model): misses tell "skipped step" from "another call site" by this
        call.state.note_call(call.step, call.site)
    if layer is None:
        run.report("block_type", f"{geometry.label} attention calls of block type "
                   f"{block.get('block_type')!r} are not among its compressible layers and ran FULL")
        return None
    if layer in call.layers_done:
        # the same block again in this model call: extra self-attention inside a block
        # (Wan VACE's control streams); only the block's own first call is its layer
        run.report("repeat", f"{geometry.label} ran extra self-attention inside block {layer} "
                   "(e.g. VACE control streams); those calls ran FULL")
        return None
    call.layers_done.add(layer)
    if layer >= geometry.layers:
        run.report("layers", f"the model ran more self-attention layers than the plan's "
                   f"{geometry.layers}; the extra ones ran FULL")
        return None
    if unsupported is not None:
        call.state.count("passthrough")
        run.report(f"unsupported {unsupported}", f"attention calls with {unsupported} run as the model "
                   "makes them (FULL): the window kernels cannot honour it")
        return None
    if call.step is None:
        return None
    return layer, ctx


def route_attention(
    call: ModelCall,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    heads: int,
    skip_reshape: bool,
    skip_output_reshape: bool,
    block: Mapping[str, Any],
    unsupported: str | None,
    dense: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    passthrough: Callable[[], torch.Tensor],
) -> torch.Tensor:
    """One attention call of ``call``: to the run if ``place_call`` places it, else
    ``passthrough()`` (as the model makes it)."""
    seq_q = q.shape[2] if skip_reshape else q.shape[1]
    seq_k = k.shape[2] if skip_reshape else k.shape[1]
    placed = place_call(call, q.shape[0], seq_q, seq_k, block, unsupported)
    if placed is None:
        return passthrough()
    layer, ctx = placed
    if not skip_reshape and v.dim() == 4:  # SD3 passes v as (B, L, H, D)
        v = v.reshape(v.shape[0], v.shape[1], -1)
    return call.run.attention(call, layer, ctx, q, k, v, dense, passthrough, heads=heads, skip_reshape=skip_reshape,
                              skip_output_reshape=skip_output_reshape)


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


def make_override(previous: Callable | None, slot: CallSlot) -> Callable:
    """An optimized_attention_override that compresses image self-attention and hands
    everything else, and every dense computation, to what would have run without it
    (``DenseChain``: ``previous``, the module's own backend or the core's). It takes the
    tensors (0.3.x-0.30) and, through its ``container_function``, the tensor containers of
    ComfyUI 0.35+, which it passes on unconsumed wherever it does not compute the call."""

    def route(func: Callable | None, args: tuple, kwargs: dict) -> torch.Tensor:
        call = slot.current
        # a core that hands an override the module's own backend (0.35's wrap_attn does not)
        preferred = kwargs.pop("preferred_attention", None)
        if preferred is None and call is not None:
            preferred = call.run.preferred_attention
        chain = DenseChain(previous, func, preferred)
        if call is None:
            return chain.run(args, kwargs)
        options = kwargs.get("transformer_options") or {}
        container_type = type(args[0]) if holds_containers(args) else None
        q, k, v = peeked(args)[:3]
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
            return chain.run_tensors(qh, kh, vh, (heads,), {**rest, "skip_reshape": True, "skip_output_reshape": True},
                                     container_type)

        return route_attention(
            call, q, k, v, heads=heads, skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape,
            block=options, unsupported=unsupported, dense=dense, passthrough=lambda: chain.run(args, kwargs),
        )

    @torch.compiler.disable(reason=COMPILE_BOUNDARY)
    def fastattn_override(func, *args, **kwargs):
        return route(func, args, kwargs)

    @torch.compiler.disable(reason=COMPILE_BOUNDARY)
    def fastattn_container_function(*args, **kwargs):
        return route(None, args, kwargs)

    fastattn_override.container_function = fastattn_container_function
    fastattn_override.ditfastattn = True
    fastattn_override.previous = previous
    return fastattn_override


def is_ours(override: Any) -> bool:
    return getattr(override, "ditfastattn", False)


# PixArt: attention module patches


def make_pixart_self_attention(module: torch.nn.Module, slot: CallSlot, block_index: int) -> Callable:
    """Forward of PixArt's AttentionKVCompress (the sr_ratio == 1 path, the only one PixArt
    models use) with its attention op routed through the engine. Calls outside a FastAttn
    model call, masked calls and calls that are not a compressible layer run the module's own
    forward. The pack owns the whole module here, so AST reuses the module's output: the
    QKV and output projections are skipped too (``reused_module_output``)."""
    if getattr(module, "sr_ratio", 1) > 1:
        raise UnsupportedModelError("PixArt with KV compression (sr_ratio > 1) is not supported")
    original = type(module).forward.__get__(module)
    heads = module.num_heads
    block = {"block_index": block_index}
    optimized_attention = module_attention(module)

    def dense(q, k, v):
        return optimized_attention(q, k, v, heads, skip_reshape=True, skip_output_reshape=True)

    @torch.compiler.disable(reason=COMPILE_BOUNDARY)
    def forward(x, mask=None, HW=None, block_id=None):
        call = slot.current
        if call is None or mask is not None:
            return original(x, mask=mask, HW=HW, block_id=block_id)
        b, n, c = x.shape
        placed = place_call(call, b, n, n, block, None)
        if placed is None:
            return original(x, mask=mask, HW=HW, block_id=block_id)
        layer, ctx = placed
        strategy = call.run.strategy(call.step, layer)
        reused = reuse_module_output(strategy, layer, ctx, call.state, torch.Size((b, n, c)))
        if reused is not None:
            return reused
        q, k, v = module.qkv(x).reshape(b, n, 3, c).unbind(2)
        q, k = module.q_norm(q), module.k_norm(k)

        def as_module_does():  # the module's own attention op, bit for bit
            qh, kh, vh = (t.reshape(b, n, heads, c // heads).transpose(1, 2) for t in (q, k, v))
            return optimized_attention(qh, kh, vh, heads, mask=None, skip_reshape=True)

        out = call.run.attention(call, layer, ctx, q, k, v, dense, as_module_does, heads=heads,
                                 skip_reshape=False, skip_output_reshape=False)
        return keep_module_output(strategy, layer, ctx, call.state, module.proj(out.view(b, n, c)))

    return forward


def module_attention(module: torch.nn.Module) -> Callable[..., torch.Tensor]:
    """The core's attention op called as ``module`` calls it: on ComfyUI 0.35+ with q, k, v in
    tensor containers and the module's own backend (``comfy_attention``), so the layers FastAttn
    patches but leaves alone, and its dense computations, run the backend the checkpoint chose."""
    import comfy.ldm.modules.attention as core

    container = getattr(core, "AttentionTensorContainer", None)
    own = getattr(module, "comfy_attention", None)
    if container is None:
        return core.optimized_attention

    def attention(q, k, v, heads, **kwargs):
        return core.optimized_attention(container(q), container(k), container(v), heads, preferred_attention=own,
                                        **kwargs)

    return attention


MODULE_FORWARDS: dict[str, Callable[[torch.nn.Module, CallSlot, int], Callable]] = {
    "AttentionKVCompress": make_pixart_self_attention,
}
"""The patched forward of each attention-module type a family attaches by (``ModulePatches``)."""


def attach_modules(model: Any, geometry: Geometry, slot: CallSlot) -> None:
    """Object-patch the attention module of each layer on ``model`` (a clone) where the family
    attaches by module patches; families attached by the override get it per run instead."""
    if geometry.attach == OVERRIDE:
        return
    make_forward = MODULE_FORWARDS[geometry.attach.module]
    for i in range(geometry.layers):
        name = geometry.attach.path.format(index=i)
        model.add_object_patch(f"{name}.forward", make_forward(model.get_model_object(name), slot, i))
