"""What one model call tells the attention engine: its step, its CFG rows, its tokens."""

from __future__ import annotations

import functools
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch

from .kernels import FailSafeKernel, checked_kernel
from .state import PLAIN_SITE, CacheKey
from .strategies import COND
from .window import TokenLayout, Window, WindowSpec


@dataclass(frozen=True)
class Chunk:
    """Rows ``rows`` of the batch belong to CFG ``branch``; ``occurrence`` tells apart
    several chunks of one branch (several conds in one call); ``cond`` names the cond where
    the caller knows it (ComfyUI's uuid), ``site`` the model call site."""

    branch: int
    occurrence: int
    rows: slice
    site: Hashable = PLAIN_SITE
    cond: Hashable | None = None

    def cache_key(self, layer: int) -> CacheKey:
        """Where this chunk's caches of ``layer`` live in the run's ``RunState``: its own call
        site and cond, so no other model call of a step reads or overwrites them."""
        return CacheKey(layer, self.branch, self.site, self.occurrence if self.cond is None else self.cond)

    @property
    def size(self) -> int:
        return self.rows.stop - self.rows.start


@dataclass(frozen=True)
class CallContext:
    """Per-model-call facts, built once per model call (and token count) by the sampler
    hook and shared by all its attention calls, which is where the window is bound to the
    tokens and its kernel chosen, once.

    step:           the plan step this call belongs to; None when the call cannot be mapped
                    to a step safely, which makes every layer run FULL without caching.
    cond_or_uncond: ComfyUI's branch per batch chunk (0 = cond, 1 = uncond); the batch is
                    that many equal chunks in that order.
    tokens:         where the image tokens are and their grid (needed by window strategies).
    window:         the plan's window shape.
    kernel:         window kernel name, or "auto".
    module_outputs: the caller keeps and reuses the attention module's whole output for AST
                    (projections included), so the engine keeps no attention outputs.
    site:           the model call site (a context window, a guidance call): caches are kept
                    and read per site.
    conds:          an identity per chunk (ComfyUI's cond uuids), or None.
    cfg_pair:       the chunks' branches are a CFG pair (0 = positive, 1 = negative), so CFG
                    sharing may copy one to the other; False for guiders whose cond lists mean
                    something else (Dual CFG's [negative, middle, positive]).
    cfg_elsewhere:  the call holds part of its CFG chunks, the others run on other GPUs
                    (raylight's CFG parallel): CFG sharing has nothing to share with.
    """

    step: int | None
    cond_or_uncond: tuple[int, ...] = (COND,)
    tokens: TokenLayout | None = None
    window: WindowSpec = WindowSpec()
    kernel: str = "auto"
    module_outputs: bool = False
    site: Hashable = PLAIN_SITE
    conds: tuple[Hashable, ...] | None = None
    cfg_pair: bool = True
    cfg_elsewhere: bool = False
    _kernels: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    """The window kernel chosen per (device, dtype, head dim)."""

    def __post_init__(self) -> None:
        if not self.cond_or_uncond:
            raise ValueError("cond_or_uncond must name at least one chunk")
        bad = [b for b in self.cond_or_uncond if not isinstance(b, int) or b < 0]
        if bad:
            raise ValueError(f"cond_or_uncond holds invalid branch values {bad} (0 = cond, 1 = uncond, 2+ = extra conds)")
        if self.conds is not None and len(self.conds) != len(self.cond_or_uncond):
            raise ValueError(f"{len(self.conds)} cond identities for {len(self.cond_or_uncond)} chunks")

    @functools.cached_property
    def bound_window(self) -> Window:
        """The window laid on this call's tokens."""
        if self.tokens is None:
            raise ValueError("window attention needs the call's token layout (grid, text span)")
        return self.window.bind(self.tokens)

    def window_kernel(self, q: torch.Tensor) -> FailSafeKernel:
        """The kernel for this call's window on ``q`` (chosen once per device, dtype and
        head dim: a model call may mix them only across offloaded blocks), checked against
        dense attention the first time the process runs it on them."""
        key = (q.device, q.dtype, q.shape[-1])
        kernel = self._kernels.get(key)
        if kernel is None:
            kernel = self._kernels[key] = checked_kernel(self.bound_window, q, self.kernel)
        return kernel

    def chunks(self, batch: int) -> list[Chunk]:
        n = len(self.cond_or_uncond)
        if batch % n:
            raise ValueError(
                f"batch of {batch} rows cannot be split into {n} CFG chunks {self.cond_or_uncond}"
            )
        size = batch // n
        seen: dict[int, int] = {}
        out = []
        for i, branch in enumerate(self.cond_or_uncond):
            occ = seen.get(branch, 0)
            seen[branch] = occ + 1
            cond = None if self.conds is None else self.conds[i]
            out.append(Chunk(branch, occ, slice(i * size, (i + 1) * size), self.site, cond))
        return out
