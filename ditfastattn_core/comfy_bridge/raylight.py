"""raylight (the multi-GPU node pack): FastAttn under its sequence and CFG parallelism.

raylight runs one sampling run on several GPUs, each worker a ComfyUI ModelPatcher of its own
(the pack reaches it through "Apply FastAttn (Ray)", which installs the plan on every worker).
What it changes for the pack, read from raylight 1.5.1 and xfuser 0.7.0:

- **Sequence parallel (USP, Ulysses).** raylight replaces the block forwards; their attention
  calls xfuser's ``xFuserLongContextAttention`` without transformer_options, so ComfyUI's
  attention override never runs. Inside it an all-to-all gives every rank the *whole*
  sequence for its share of the heads, then ``self.ring_attn_fn`` computes attention. The pack
  routes that one call (``install_ring_route``): WA-RS, AST and ASC act per head on whole
  sequences, so every rank follows the same plan with caches of its own and no extra
  communication. Which layer is running comes from forward hooks on the layer modules (the
  model no longer tells attention), and the rank-ordered sequence is put back in the model's
  own token order (``SequenceSplit``) before the window is laid on it.
- **Ring degree > 1** splits sequences across ranks inside attention: FULL, said once.
- **CFG parallel.** raylight's DIFFUSION_MODEL wrapper keeps one CFG branch per rank but leaves
  ``cond_or_uncond`` listing both: ``cfg_part`` names the rank's own chunks, so a batch is never
  split by a stale branch list; ASC, whose other branch is on another GPU, runs FULL (counted).
- **Data parallel and FSDP** run ComfyUI's own attention on each worker: nothing to do here.

Nothing here imports xfuser: it is read from ``sys.modules`` where raylight loaded it.
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .attention_hooks import COMPILE_BOUNDARY, CallSlot, place_call

PARALLEL_STATE = "xfuser.core.distributed.parallel_state"
LONG_CONTEXT_ATTENTION = "xfuser.core.long_ctx_attention.hybrid.attn_layer"


@dataclass(frozen=True)
class ParallelGroups:
    """This process's place in raylight's xfuser groups."""

    sp_world: int = 1
    ring_world: int = 1
    cfg_rank: int = 0
    cfg_world: int = 1
    pp_world: int = 1

    @property
    def usp(self) -> bool:
        return self.sp_world > 1


def parallel_groups() -> ParallelGroups | None:
    """raylight's parallel groups in this process (xfuser's, initialised by raylight's worker),
    or None where there are none (a plain ComfyUI, raylight's data parallel without xfuser)."""
    state = sys.modules.get(PARALLEL_STATE)
    if state is None or not state.model_parallel_is_initialized():
        return None
    return ParallelGroups(
        sp_world=state.get_sequence_parallel_world_size(), ring_world=state.get_ring_parallel_world_size(),
        cfg_rank=state.get_classifier_free_guidance_rank(),
        cfg_world=state.get_classifier_free_guidance_world_size(),
        pp_world=state.get_pipeline_parallel_world_size(),
    )


# --- the token order of raylight's gathered sequences ---------------------------------------

WHOLE = "whole"
"""The block's sequence is split in the model's own order (padded at the end): the gathered
sequence is the model's."""
TEXT_IMAGE_PER_RANK = "text_image_per_rank"
"""Text and image are split separately and each rank concatenates its text part and image part:
the gathered sequence is [text_0, image_0, text_1, image_1, ...]."""


@dataclass(frozen=True)
class SequenceSplit:
    """How raylight's USP forward splits one block type's self-attention sequence over the
    ranks, and which module of the ModelPatcher runs layer ``index``'s attention."""

    module: str
    order: str
    text: bool = True
    """The sequence holds the conditioning's text tokens before the image's (joint attention)."""


USP_FAMILIES: dict[str, dict[str | None, SequenceSplit]] = {
    # raylight/diffusion_models/flux/xdit_context_parallel.py: double blocks chunk txt and img
    # apart and cat((txt, img)) per rank; single blocks chunk cat((txt, img)) as a whole
    "flux": {"double": SequenceSplit("diffusion_model.double_blocks.{index}", TEXT_IMAGE_PER_RANK),
             "single": SequenceSplit("diffusion_model.single_blocks.{index}", WHOLE)},
    # raylight/diffusion_models/wan/xdit_context_parallel.py: x chunked whole; self-attention only
    "wan": {"double": SequenceSplit("diffusion_model.blocks.{index}.self_attn", WHOLE, text=False)},
}
"""The families whose raylight USP sequence split the pack has mapped (and tests); others run
FULL under USP, said once."""


class SequenceMismatch(ValueError):
    """A gathered sequence that is not the split the pack expects (padding, extra tokens)."""


def model_order(split: SequenceSplit, seq_len: int, text_len: int | None, image_tokens: int,
                ranks: int) -> torch.Tensor | None:
    """Positions in the gathered sequence of the model's tokens in the model's own order
    ([text, image] or [image]); None where the two orders are the same. Raises
    ``SequenceMismatch`` where raylight padded the split (token counts that do not divide by
    the ranks) or the sequence holds other tokens: the window's geometry would not hold."""
    text = (text_len or 0) if split.text else 0
    if seq_len != text + image_tokens:
        raise SequenceMismatch(f"{seq_len} tokens where {text} text + {image_tokens} image tokens were expected")
    if split.order == WHOLE:
        return None
    if text % ranks or image_tokens % ranks:
        raise SequenceMismatch(f"{text} text and {image_tokens} image tokens do not divide by {ranks} ranks")
    t, i = text // ranks, image_tokens // ranks
    text_pos = torch.arange(text).div(t, rounding_mode="floor") * (t + i) + torch.arange(text) % t
    image_pos = torch.arange(image_tokens).div(i, rounding_mode="floor") * (t + i) + t + torch.arange(image_tokens) % i
    return torch.cat([text_pos, image_pos])


# --- the route into xfuser's attention --------------------------------------------------------


class _Marks(threading.local):
    """The layer whose attention module is running on this thread: (route, call, block)."""

    def __init__(self) -> None:
        self.current: tuple[SequenceRoute, Any, dict[str, Any]] | None = None


_MARKS = _Marks()


class _RoutedRingAttention:
    """A data descriptor for ``xFuserLongContextAttention.ring_attn_fn``: instances keep their
    own function (set in ``__init__``, before or after this was installed) and get it back
    unchanged, unless one of the pack's USP runs marked the layer now running, which routes the
    call through ``SequenceRoute.attention``."""

    ditfastattn = True

    def __get__(self, instance: Any, owner: type) -> Any:
        if instance is None:
            return self
        raw = instance.__dict__["ring_attn_fn"]
        mark = _MARKS.current
        if mark is None:
            return raw
        route, call, block = mark
        return lambda *args, **kwargs: route.attention(raw, call, block, *args, **kwargs)

    def __set__(self, instance: Any, value: Any) -> None:
        instance.__dict__["ring_attn_fn"] = value


def install_ring_route() -> bool:
    """Route xfuser's long-context attention through the pack (once per process; a no-op for
    calls outside a FastAttn USP run). False where xfuser's attention class is not loaded."""
    module = sys.modules.get(LONG_CONTEXT_ATTENTION)
    cls = getattr(module, "xFuserLongContextAttention", None)
    if cls is None or not isinstance(cls, type):
        return False
    if not getattr(cls.__dict__.get("ring_attn_fn"), "ditfastattn", False):
        cls.ring_attn_fn = _RoutedRingAttention()
    return True


UNHONOURED = ("joint_tensor_key", "attn_layer")
"""xfuser arguments that change what a call computes beyond plain softmax attention on q, k, v
(MMDiT joint tensors appended inside attention, PipeFusion's KV cache)."""


@dataclass
class SequenceRoute:
    """One FastAttn run under raylight's sequence parallelism: the layer marks, the token
    order per block type, and what reached the pack (``close`` says if nothing did)."""

    splits: Mapping[str | None, SequenceSplit]
    ranks: int
    handles: list[Any] = field(default_factory=list)
    marked: int = 0
    routed: int = 0
    orders: dict[tuple, tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=dict)
    """Per block type and token counts: the model order and its inverse (None: the same order)."""

    def mark_layers(self, diffusion_root: Any, offsets: Mapping[str | None, int], layers: int, slot: CallSlot) -> None:
        """Forward hooks on each layer's attention module: while it runs, attention knows its
        layer (raylight's forwards do not pass transformer_options to attention)."""
        starts = sorted(offsets.items(), key=lambda kv: kv[1])
        for n, (block_type, start) in enumerate(starts):
            stop = starts[n + 1][1] if n + 1 < len(starts) else layers
            split = self.splits[block_type]
            for index in range(stop - start):
                module = diffusion_root.get_submodule(split.module.format(index=index))
                block = {"block_type": block_type, "block_index": index}
                self.handles.append(module.register_forward_pre_hook(self._enter(slot, block)))
                self.handles.append(module.register_forward_hook(_leave, always_call=True))

    def _enter(self, slot: CallSlot, block: dict[str, Any]) -> Callable:
        @torch.compiler.disable(reason=COMPILE_BOUNDARY)
        def enter(module, args):
            call = slot.current
            _MARKS.current = None if call is None else (self, call, block)
            self.marked += call is not None

        return enter

    def close(self, run: Any) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        _MARKS.current = None
        if self.marked and not self.routed:
            run.state.count("usp_unrouted")
            run.report("usp_unrouted", "raylight's sequence parallel ran the plan's layers but none of their attention "
                       "reached FastAttn (xfuser's attention changed?): the run was FULL")

    def order(self, block: Mapping[str, Any], seq_len: int, text_len: int | None,
              image_tokens: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The model order of a gathered sequence and its inverse, computed once per run and shape
        (attention asks at every layer of every step)."""
        key = (block.get("block_type"), seq_len, text_len, image_tokens, device)
        if key not in self.orders:
            split = self.splits[block.get("block_type")]
            index = model_order(split, seq_len, text_len, image_tokens, self.ranks)
            self.orders[key] = None if index is None else (index.to(device), torch.argsort(index).to(device))
        return self.orders[key]

    def attention(self, raw: Callable, call: Any, block: dict[str, Any], q: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """xfuser's ring attention on this rank's heads of the whole sequence, (B, L, H, D),
        for the layer ``block`` of model call ``call``: through the engine where the plan
        compresses it, else exactly as xfuser computes it."""
        _MARKS.current = None  # one self-attention per layer module; a second call is not it
        self.routed += 1

        def as_xfuser():
            return raw(q, k, v, *args, **kwargs)

        run = call.run
        if k.shape[1] != q.shape[1] or call.grid is None:
            return as_xfuser()
        if any(kwargs.get(name) is not None for name in UNHONOURED) or kwargs.get("causal") \
                or kwargs.get("dropout_p") or tuple(kwargs.get("window_size", (-1, -1))) != (-1, -1):
            run.report("usp_arguments", "xfuser attention with joint tensors, a KV cache, a causal mask, dropout or "
                       "its own window ran FULL")
            return as_xfuser()
        scale = kwargs.get("softmax_scale")
        if scale is not None and not math.isclose(float(scale), q.shape[-1] ** -0.5, rel_tol=1e-6):
            run.report("usp_scale", "xfuser attention with a custom softmax scale ran FULL")
            return as_xfuser()
        try:
            orders = self.order(block, q.shape[1], call.text_len, math.prod(call.grid), q.device)
        except SequenceMismatch as e:
            call.state.count("usp_unsplit")
            run.report("usp_layout", f"raylight split a {run.geometry.label} sequence other than FastAttn expects "
                       f"({e}; raylight pads token counts that do not divide by the GPUs): those layers ran FULL; "
                       "a size whose text and image token counts divide by the number of GPUs compresses")
            return as_xfuser()
        placed = place_call(call, q.shape[0], q.shape[1], k.shape[1], block, None)
        if placed is None:
            return as_xfuser()
        layer, ctx = placed
        order, inverse = orders if orders is not None else (None, None)

        def to_model(t):  # (B, L, H, D) rank order -> (B, H, L, D) model order
            return (t if order is None else t.index_select(1, order)).transpose(1, 2)

        def to_ranks(t):  # (B, H, L, D) model order -> (B, L, H, D) rank order
            t = t.transpose(1, 2)
            return t if inverse is None else t.index_select(1, inverse)

        def dense(qh, kh, vh):  # xfuser's own computation, in its own token order (bit for bit)
            out = raw(to_ranks(qh), to_ranks(kh), to_ranks(vh), *args, **kwargs)
            return to_model(out[0] if isinstance(out, tuple) else out)

        def passthrough():
            out = as_xfuser()
            return to_model(out[0] if isinstance(out, tuple) else out)

        out = run.attention(call, layer, ctx, to_model(q), to_model(k), to_model(v), dense, passthrough,
                            heads=q.shape[2], skip_reshape=True, skip_output_reshape=True)
        return to_ranks(out).contiguous()


@torch.compiler.disable(reason=COMPILE_BOUNDARY)
def _leave(module, args, output):
    _MARKS.current = None


# --- a run under raylight ---------------------------------------------------------------------


def open_route(run: Any, model: Any, slot: CallSlot) -> SequenceRoute | None:
    """At the start of a run on a raylight worker: the sequence route where USP is on (layer
    marks installed), None elsewhere. Where raylight's parallelism leaves nothing the pack can
    compress, the run is made FULL and says why once."""
    run.parallel = groups = parallel_groups()
    if groups is None or not groups.usp:
        if groups is not None and groups.pp_world > 1:
            run.run_full("raylight's PipeFusion (pipeline parallel) is not supported by FastAttn: the run is FULL")
        return None
    geometry = run.geometry
    label = f"raylight sequence parallel ({groups.sp_world} GPUs)"
    if groups.ring_world > 1:
        run.run_full(f"{label} with ring degree {groups.ring_world} splits every sequence across GPUs inside attention, "
                     "so windows cannot be laid on it: the run is FULL (use Ulysses degree only)")
        return None
    splits = USP_FAMILIES.get(geometry.family)
    if splits is None:
        run.run_full(f"{label}: FastAttn maps raylight's sequence split for "
                     f"{', '.join(sorted(USP_FAMILIES))} only; this {geometry.label} run is FULL")
        return None
    if not install_ring_route():
        run.run_full(f"{label}: xfuser's long-context attention is not loaded where FastAttn expects it; the run is FULL")
        return None
    route = SequenceRoute(splits, groups.sp_world)
    route.mark_layers(model.model, geometry.block_offsets, geometry.layers, slot)
    return route


# --- the driver: "Apply FastAttn (Ray)" ---------------------------------------------------------


def parallel_summary(parallel: Mapping[str, Any], family: str) -> str:
    """What a plan does under raylight's settings (its workers' ``parallel_dict``), for the node."""
    lines = []
    if parallel.get("pipefusion_enabled"):
        return "raylight PipeFusion: not supported by FastAttn, the runs are FULL"
    ulysses, ring = int(parallel.get("ulysses_degree") or 1), int(parallel.get("ring_degree") or 1)
    if parallel.get("is_xdit") and ulysses * ring > 1:
        if ring > 1:
            lines.append(f"sequence parallel with ring degree {ring}: FULL (windows need whole sequences: use Ulysses only)")
        elif family not in USP_FAMILIES:
            lines.append(f"sequence parallel (Ulysses {ulysses}): FULL for {family} (mapped: "
                         f"{', '.join(sorted(USP_FAMILIES))})")
        else:
            lines.append(f"sequence parallel (Ulysses {ulysses}): every GPU follows the plan on its heads and holds "
                         f"1/{ulysses} of the caches; text and image token counts must divide by {ulysses} (else "
                         "those layers run FULL)")
    if parallel.get("is_xdit") and int(parallel.get("cfg_degree") or 1) > 1:
        lines.append("CFG parallel: WA-RS and AST per GPU, each holding its branch's caches; ASC runs FULL (the "
                     "conditional branch is on another GPU)")
    if not lines:
        mode = "FSDP" if parallel.get("is_fsdp") else "data parallel"
        lines.append(f"{mode}: each GPU runs the plan as on one GPU")
    return "raylight: " + "; ".join(lines)


def install_on_workers(ray_actors: Mapping[str, Any], plan_json: dict, options: dict) -> str:
    """Install a plan on every raylight worker's model (as Apply FastAttn does on one GPU; a plan
    that does not fit the model is refused there, before sampling); returns the node's line."""
    import ray

    from . import raylight_worker

    workers = list(ray_actors.get("workers") or [])
    if not workers:
        raise ValueError("the raylight actors have no workers: connect Load Diffusion Model (Ray)")
    ray.cloudpickle.register_pickle_by_value(raylight_worker)  # the workers never loaded the pack
    root = str(Path(__file__).resolve().parents[2])
    try:
        ray.get([w.model_function_runner.remote(raylight_worker.install_plan, root, plan_json, options)
                 for w in workers])
        family = ray.get(workers[0].model_function_runner_get_values.remote(raylight_worker.model_family, root))
        parallel = ray.get(workers[0].get_parallel_dict.remote())
    except ray.exceptions.RayTaskError as e:
        raise ValueError(f"FastAttn on the raylight workers: {e.cause if e.cause is not None else e}") from e
    return parallel_summary(parallel, family)
