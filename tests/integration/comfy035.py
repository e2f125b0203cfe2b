"""ComfyUI 0.35+'s attention contracts, laid over a real (older) ComfyUI tree for a test.

No ComfyUI newer than 0.30 runs here, so these tests hold the pack to the contracts as read in
the newer files, written here in our own code (nothing is copied from ComfyUI):

- ``wrap_attn`` with tensor containers and ``preferred_attention``
  (Comfy-Org/ComfyUI@05080f60, comfy/ldm/modules/attention.py: ``AttentionTensorContainer``,
  ``wrap_attn``, ``ComfyAttention``); Flux's attention passes its q, k, v as containers with its
  module's ``preferred_attention`` (Comfy-Org/ComfyUI@980c56ce, comfy/ldm/flux/math.py);
- ``ModelPatcher.set_model_optimized_attention`` (the "Model Attention Backend" node,
  Comfy-Org/ComfyUI@691e8278, comfy_extras/nodes_model_advanced.py): an override that calls the
  backend, ignores the previous override and carries the backend's ``container_function``;
  open core PR #16116 adds a ``memory_efficient`` tag;
- core "Model Sparse Attention" (Comfy-Org/ComfyUI@cf3103c5, comfy_extras/nodes_sparse_attention.py
  and sparse_attention_history.py): an override put on top of the current one at patch time and
  again at every step (ON_PREPARE_STATE), marked with ``_block_sparse_attention_patch`` /
  ``_block_sparse_attention_previous``, that computes eligible calls itself (sparse) and hands
  the rest to the previous override (or the backend).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

OVERRIDE_KEY = "optimized_attention_override"


class Container:
    """Single-owner tensor input (the contract of ``AttentionTensorContainer``)."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def peek(self) -> torch.Tensor:
        if self.tensor is None:
            raise RuntimeError("attention tensor container has already been consumed")
        return self.tensor

    def take(self) -> torch.Tensor:
        tensor = self.peek()
        self.tensor = None
        return tensor


def _take_all(args):
    return tuple(a.take() for a in args[:3]) + tuple(args[3:])


def wrap_attn(func):
    """The 0.35 dispatch: an override first (through its container function when the call holds
    containers, else on the taken tensors), else the module's preferred backend, else ``func``
    (through the wrapper's own container function where it has one)."""

    def wrapper(*args, **kwargs):
        preferred = kwargs.pop("preferred_attention", None)
        containers = len(args) >= 3 and isinstance(args[0], Container)
        if "_inside_attn_wrapper" not in kwargs:
            kwargs = {**kwargs, "_inside_attn_wrapper": True}
            override = (kwargs.get("transformer_options") or {}).get(OVERRIDE_KEY)
            if override is not None:
                if containers:
                    container_function = getattr(override, "container_function", None)
                    if container_function is not None:
                        return container_function(*args, **kwargs)
                    args = _take_all(args)
                return override(func, *args, **kwargs)
            if preferred is not None and preferred.function is not None:
                return preferred.function(*args, **kwargs)
        if containers:
            if wrapper.container_function is not None:
                return wrapper.container_function(*args, **kwargs)
            args = _take_all(args)
        return func(*args, **kwargs)

    wrapper.container_function = None
    wrapper.__wrapped__ = func
    return wrapper


@dataclass
class Backend:
    """A dense attention backend that differs visibly from the core's (q and k rounded to a grid,
    as a quantized kernel would), with a container function that consumes the containers (the
    "prequantize, then free q/k/v" path). ``calls`` counts container and tensor calls apart."""

    grid: float
    calls: dict[str, int] = field(default_factory=lambda: {"containers": 0, "tensors": 0})

    def __post_init__(self) -> None:
        import comfy.ldm.modules.attention as core

        inner = core.attention_pytorch.__wrapped__

        def compute(q, k, v, heads, **kwargs):
            q, k = (torch.round(t * self.grid) / self.grid for t in (q, k))
            return inner(q, k, v, heads, **kwargs)

        def quantized(q, k, v, heads, **kwargs):
            self.calls["tensors"] += 1
            return compute(q, k, v, heads, **kwargs)

        def quantized_containers(q, k, v, heads, **kwargs):
            self.calls["containers"] += 1
            return compute(q.take(), k.take(), v.take(), heads, **kwargs)

        self.function = wrap_attn(quantized)
        self.function.container_function = quantized_containers
        self.memory_efficient = True


class ComfyAttention:
    """A module's own attention choice (``ComfyAttention``: ``function`` set from the checkpoint;
    an nn.Module child there, a plain attribute here so the test can undo it)."""

    def __init__(self, function=None):
        self.function = function


def set_model_optimized_attention(patcher, backend, memory_efficient: bool | None = None) -> None:
    """What the Model Attention Backend node does to a patcher (the previous override is dropped)."""

    def optimized_attention_override(_func, *args, **kwargs):
        return backend(*args, **kwargs)

    container_function = getattr(backend, "container_function", None)
    if container_function is not None:
        optimized_attention_override.container_function = container_function
    patcher.model_options.setdefault("transformer_options", {})[OVERRIDE_KEY] = optimized_attention_override
    if memory_efficient is not None:
        patcher.model_options["optimized_attention_memory_efficient"] = memory_efficient


@dataclass
class SparsePatch:
    """Core Model Sparse Attention's per-model state; its override computes a call itself when
    ``eligible`` (the core: CUDA, head dim 128, >= min_tokens, sigma inside start/end, block not
    dense), else hands it on."""

    sigma_start: float
    sigma_end: float
    min_tokens: int = 0
    installed: set = field(default_factory=set)
    computed: int = 0
    handed_on: int = 0

    def eligible(self, options: dict, tokens: int) -> bool:
        sigmas = options.get("sigmas")
        sigma = float(sigmas[0]) if sigmas is not None else None
        return (sigma is None or self.sigma_end <= sigma <= self.sigma_start) and tokens >= self.min_tokens

    def make_override(self, previous):
        def override(func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                     skip_output_reshape=False, **kwargs):
            options = kwargs.get("transformer_options") or {}
            tokens = q.shape[2] if skip_reshape else q.shape[1]
            if mask is not None or not self.eligible(options, tokens):
                self.handed_on += 1
                kw = dict(mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape,
                          skip_output_reshape=skip_output_reshape, **kwargs)
                args = (q, k, v, heads)
                return func(*args, **kw) if previous is None else previous(func, *args, **kw)
            self.computed += 1  # "sparse": a result the dense backends never give
            out = func(q * 0.5, k, v, heads, attn_precision=attn_precision, skip_reshape=skip_reshape,
                       skip_output_reshape=skip_output_reshape, **kwargs)
            return out

        override._block_sparse_attention_patch = self
        override._block_sparse_attention_previous = previous
        return override

    def install(self, transformer_options: dict) -> None:
        current = transformer_options.get(OVERRIDE_KEY)
        if current in self.installed:
            return
        override = self.make_override(current)
        self.installed.add(override)
        transformer_options[OVERRIDE_KEY] = override


def model_sparse_attention(patcher, patch: SparsePatch):
    """What the core Model Sparse Attention node returns: a clone with its override on top now and
    again at every step."""
    import inspect

    import comfy.model_patcher
    import comfy.patcher_extension
    import pytest

    if "model_options" not in inspect.signature(comfy.model_patcher.ModelPatcher.prepare_state).parameters:
        pytest.skip("this ComfyUI's ON_PREPARE_STATE callbacks get no model options, where core Model Sparse "
                    "Attention re-installs its override (it needs a newer ComfyUI)")
    m = patcher.clone()
    patch.install(m.model_options.setdefault("transformer_options", {}))
    m.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_PREPARE_STATE, "block_sparse_attention",
                            lambda model_patcher, timestep, model_options: patch.install(
                                model_options["transformer_options"]))
    return m


def flux_with_containers(monkeypatch, patcher, module_backend: Backend | None) -> ComfyAttention:
    """Make a real tree's Flux call attention as 0.35 does: containers, the module's preferred
    backend, the 0.35 dispatch around the core's pytorch attention."""
    import comfy.ldm.flux.layers as layers
    import comfy.ldm.flux.math as flux_math
    import comfy.ldm.modules.attention as core

    optimized = wrap_attn(core.attention_pytorch.__wrapped__)
    preferred = ComfyAttention(module_backend.function if module_backend is not None else None)

    def attention(q, k, v, pe, mask=None, transformer_options={}):  # noqa: B006 (the model's signature)
        if pe is not None:
            q, k = flux_math.apply_rope(q, k, pe)
        return optimized(Container(q), Container(k), Container(v), q.shape[1], skip_reshape=True, mask=mask,
                         transformer_options=transformer_options, preferred_attention=preferred)

    monkeypatch.setattr(core, "optimized_attention", optimized)
    monkeypatch.setattr(layers, "attention", attention)
    for name, module in list(patcher.model.diffusion_model.named_modules()):
        if name.endswith("attn") and hasattr(module, "qkv"):  # each attention module carries the choice
            monkeypatch.setattr(module, "comfy_attention", preferred, raising=False)
    return preferred
