"""What an attention call runs where FastAttn does not compute it: ComfyUI's override chain.

The pack's override sits on top of whatever the graph set before it (another pack's override,
the core "Model Attention Backend" node) and hands it every call and every dense computation
it does not compute itself. ComfyUI 0.35+ changed what "whatever ran before" means
(``comfy/ldm/modules/attention.py``, ``wrap_attn``, Comfy-Org/ComfyUI@05080f60):

- an attention module may pass its q, k and v as single-owner tensor *containers*
  (``AttentionTensorContainer``: ``peek()``, ``take()``) so a backend can prequantize them and
  free the originals; an override receives the containers only through its
  ``container_function`` attribute (called without ``func``), otherwise the tensors are taken
  out and the override called as before;
- a module may pass its own backend as ``preferred_attention`` (an object whose ``function``
  is set from the checkpoint, e.g. comfy-kitchen INT8 attention); ``wrap_attn`` uses it only
  when no override is set, and does not hand it to an override.

``DenseChain.run`` does what ``wrap_attn`` would have done for a call without FastAttn: the
previous override (its container function where it has one), else the module's own backend,
else the core's. ``preferred_backend`` finds the module's own backend where ComfyUI does not
pass it on. ``memory_efficient`` tags the override for ComfyUI's memory estimate (open core
PR #16116 reads an override's ``memory_efficient``; untagged, it would size attention 7.5x
larger). ``outer_sparse_patch`` recognises the core "Model Sparse Attention" node's override
(``comfy_extras/nodes_sparse_attention.py`` and ``sparse_attention_history.py``,
Comfy-Org/ComfyUI@cf3103c5), which re-installs itself around the current override at every
step and computes the calls it makes sparse without passing them on.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

CORE_ATTENTION_MODULE = "comfy.ldm.modules.attention"


def is_container(value: Any) -> bool:
    """A ComfyUI attention tensor container (duck-typed: ``peek``/``take``, not a tensor)."""
    return not isinstance(value, torch.Tensor) and callable(getattr(value, "take", None)) \
        and callable(getattr(value, "peek", None))


def holds_containers(args: Sequence[Any]) -> bool:
    return len(args) >= 3 and is_container(args[0])


def peeked(args: Sequence[Any]) -> tuple:
    """q, k, v (and the rest) with containers looked into, not consumed."""
    if not holds_containers(args):
        return tuple(args)
    return tuple(a.peek() for a in args[:3]) + tuple(args[3:])


def taken(args: Sequence[Any]) -> tuple:
    """q, k, v (and the rest) with containers consumed, as ``wrap_attn`` does before calling an
    override or a backend that has no container function."""
    if not holds_containers(args):
        return tuple(args)
    return tuple(a.take() for a in args[:3]) + tuple(args[3:])


def core_attention() -> Callable:
    """The core's ``optimized_attention`` (looked up per call: ComfyUI may reassign it). Called
    with ``_inside_attn_wrapper`` set, it runs its own backend, containers included."""
    return sys.modules[CORE_ATTENTION_MODULE].optimized_attention


@dataclass(frozen=True)
class DenseChain:
    """What an attention call runs without FastAttn."""

    previous: Callable | None
    """The override the graph set before FastAttn's (None: none)."""
    func: Callable | None
    """The backend ``wrap_attn`` handed the override; None on the container path, which gets
    none (the core's ``optimized_attention`` stands in)."""
    preferred: Any = None
    """The module's own backend (``preferred_attention``): used where no previous override is."""

    def run(self, args: Sequence[Any], kwargs: dict[str, Any]) -> torch.Tensor:
        if self.previous is not None:
            container_function = getattr(self.previous, "container_function", None)
            if container_function is not None and holds_containers(args):
                return container_function(*args, **kwargs)
            return self.previous(self.backend(), *taken(args), **kwargs)
        preferred = getattr(self.preferred, "function", None)
        if preferred is not None:
            return preferred(*args, **kwargs)
        if self.func is None:
            return core_attention()(*args, **kwargs)
        return self.func(*taken(args), **kwargs)

    def backend(self) -> Callable:
        return self.func if self.func is not None else core_attention()

    def run_tensors(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rest: tuple,
                    kwargs: dict[str, Any], container_type: type | None) -> torch.Tensor:
        """A dense computation of the engine's, on (B, H, L, D) tensors, by the same backend;
        as containers where the call came in containers (so a backend that prequantizes gets
        them)."""
        if container_type is not None:
            q, k, v = container_type(q), container_type(k), container_type(v)
        return self.run((q, k, v, *rest), kwargs)


class MixedModuleBackends(ValueError):
    """The checkpoint chooses different attention backends per module, and ComfyUI does not
    tell an override which module calls it."""


def preferred_backend(diffusion_model: Any) -> Any:
    """The attention backend the checkpoint's attention modules choose for themselves (their
    ``comfy_attention``, whose ``function`` ComfyUI 0.35+ sets from the checkpoint), or None
    where none does (every older ComfyUI). Raises ``MixedModuleBackends`` where modules choose
    different ones."""
    if not isinstance(diffusion_model, torch.nn.Module):
        return None
    chosen: dict[int, Any] = {}
    for module in diffusion_model.modules():
        own = getattr(module, "comfy_attention", None)
        if own is not None and getattr(own, "function", None) is not None:
            chosen.setdefault(id(own.function), own)
    if len(chosen) > 1:
        raise MixedModuleBackends(
            "this checkpoint chooses different attention backends for different layers, and this ComfyUI does not "
            "tell attention overrides which layer calls them, so FastAttn could not run the layers it leaves alone "
            "with their own backend: sample this model without Apply FastAttn")
    return next(iter(chosen.values()), None)


def memory_efficient(previous: Callable | None, model_options: dict[str, Any]) -> bool | None:
    """Whether the dense path of an override chaining ``previous`` is memory-efficient, as
    ComfyUI's memory estimate asks of an override (open core PR #16116): the previous
    override's own tag, or what the graph set for it (``optimized_attention_memory_efficient``
    in the model options), or, with no previous override, the core's choice for its own
    backend; None where unknown (left untagged: the conservative estimate)."""
    if previous is not None:
        tag = getattr(previous, "memory_efficient", None)
        if tag is None:
            tag = model_options.get("optimized_attention_memory_efficient")
        return None if tag is None else bool(tag)
    core = sys.modules.get(CORE_ATTENTION_MODULE)
    tag = getattr(core, "optimized_attention_memory_efficient", None)
    if tag is not None:
        return bool(tag)
    management = sys.modules.get("comfy.model_management")
    if management is None:
        return None
    # the rule BaseModel.memory_required applies before that PR (comfy/model_base.py:416 in 0.29.0)
    return bool(management.xformers_enabled() or management.pytorch_attention_flash_attention())


SPARSE_PATCH_ATTR = "_block_sparse_attention_patch"
SPARSE_PREVIOUS_ATTR = "_block_sparse_attention_previous"
"""The provenance the core Model Sparse Attention node publishes on its override
(``sparse_attention_history.mark_attention_override``)."""


def outer_sparse_patch(override: Any) -> Any:
    """The core Model Sparse Attention patch whose override this is, or None."""
    return getattr(override, SPARSE_PATCH_ATTR, None)


SPARSE_CALLBACK_KEY = "block_sparse_attention"
"""The key of the ON_PREPARE_STATE callback by which core Model Sparse Attention re-installs itself."""


def has_core_sparse_attention(patcher: Any) -> bool:
    """Whether core Model Sparse Attention is on this ModelPatcher (its override on top, or its
    per-step callback that puts it back on top: a backend patch set after it is wrapped again)."""
    options = (getattr(patcher, "model_options", None) or {}).get("transformer_options", {})
    if outer_sparse_patch(options.get("optimized_attention_override")) is not None:
        return True
    import comfy.patcher_extension

    callbacks = getattr(patcher, "callbacks", None) or {}
    return SPARSE_CALLBACK_KEY in callbacks.get(comfy.patcher_extension.CallbacksMP.ON_PREPARE_STATE, {})


CORE_SPARSE_ORDER = (
    "core Model Sparse Attention is in this graph: it puts itself around FastAttn's attention at every step "
    "(whichever node comes first), computes the calls it makes sparse itself and hands FastAttn the rest, which "
    "FastAttn compresses by its plan; a cache FastAttn would read from a layer it computed is a miss (FULL)")
"""Which of the two computes a call when both nodes are in a graph (the order of the nodes does not
matter); the Apply node says it, and so does the run."""


def describe(override: Any) -> str:
    """A name for another pack's override in a log line."""
    if outer_sparse_patch(override) is not None:
        return "core Model Sparse Attention"
    function = getattr(override, "__func__", override)
    module = getattr(function, "__module__", None) or "?"
    return f"{module}.{getattr(function, '__qualname__', type(function).__name__)}"
