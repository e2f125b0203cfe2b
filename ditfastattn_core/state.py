"""Per-run caches: window residuals, previous outputs, and conditional outputs shared with
the unconditional branch.

One ``RunState`` lives for one sampling run (the sampler hook creates it and calls
``reset()`` in ``finally``). Entries are keyed per ``CacheKey``: the layer, the CFG branch, the
*call site* (which model call of a step wrote it: a context window's frames, a guidance call's
purpose) and the cond (ComfyUI's cond uuid, else the chunk's occurrence in its call); each
holds all sample rows of that chunk. A call reads only what the same call site and cond kept,
never another window's or another guidance call's tensors. Every entry records the step that
wrote it, so a reader can tell a valid entry from a stale one (a skipped model call, another
sample, another step), and the state records which call sites ran at each step, so a miss is
counted under its reason (``miss_reason``).

A step may hold several model calls (heun's corrector and dpmpp_2s_ancestral's second
evaluation land on the next step's sigma), and each of them must find what its strategy
reads, and some look one step ahead and come back (heunpp2). So nothing is freed while a
step runs: ``begin_step`` frees, when a call first reaches a new step, what neither the step
before it nor a later one reads. Outputs are kept per step, so the second call of an AST step
still finds the previous step's output after the first call stored its own.

With a ``schedule`` (the plan's strategies) the state looks ahead and keeps only what a
later step will read. Without one (calibration, where the future is being decided) it keeps
everything a candidate could read.

Residuals and kept outputs live where ``placement`` says: on the compute device, or in CPU
memory (pinned, with non-blocking copies, when the compute device is a GPU), copied back when
read. CFG-shared outputs never leave the device: they are read within the same step.
"""

from __future__ import annotations

import contextlib
import enum
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .schedule import Schedule
from .strategies import COND, UNCOND, Cache

PLAIN_SITE: Hashable = ()
"""The call site of a model call that nothing distinguishes (no context window, no guidance)."""


class CacheKey(NamedTuple):
    """Where one chunk's cache of one layer lives."""

    layer: int
    branch: int
    """ComfyUI's index of the chunk's cond list: 0 = cond, 1 = uncond, 2+ = a guider's extra conds."""
    site: Hashable = PLAIN_SITE
    """The model call site that computed it (opaque to the core; the sampler hook names it)."""
    cond: Hashable = 0
    """Which cond: its uuid where ComfyUI gives one, else its occurrence among the call's chunks."""




class CachePlacement(enum.Enum):
    """Where a run keeps its residuals and reused outputs."""

    DEVICE = "compute device"
    """Beside the model: no copies (the default)."""
    CPU = "cpu"
    """In CPU memory, pinned when the model runs on a GPU; copied in and out without
    blocking. Frees GPU memory at the cost of one copy each way per cache use."""


@dataclass
class _Entry:
    step: int
    tensor: torch.Tensor


@dataclass
class _Shared:
    """The conditional output one call site published at ``step`` for a separate unconditional
    call; ``source`` None: two conds of that site published at the step, so there is no single
    conditional output to share."""

    step: int
    tensor: torch.Tensor
    source: CacheKey | None


@dataclass
class RunState:
    schedule: Schedule | None = None
    placement: CachePlacement = CachePlacement.DEVICE
    residuals: dict[CacheKey, _Entry] = field(default_factory=dict)
    outputs: dict[CacheKey, dict[int, torch.Tensor]] = field(default_factory=dict)
    """Per key, the output stored at each step a call may still read (see ``begin_step``)."""
    shared_cond: dict[tuple[int, Hashable], _Shared] = field(default_factory=dict)
    """Per (layer, call site), the conditional output of this step."""
    stats: Counter = field(default_factory=Counter)
    sites: dict[int, set[Hashable]] = field(default_factory=dict)
    """The call sites that ran a model call at each step (see ``miss_reason``)."""
    outer: dict[int, set[tuple[Hashable, int]]] = field(default_factory=dict)
    """Per step, the (call site, layer) pairs another attention override computed (``note_outer``)."""
    site_misses: Counter = field(default_factory=Counter)
    """Per (miss name, call site): misses because that site did not run at the step read."""
    frozen: bool = False
    """While frozen (calibration trial forwards) nothing is written; reads still work."""
    misses: int = 0
    """Cache misses (a strategy that fell back), counted even while frozen: calibration
    uses it to reject a candidate that only looked good because it silently ran dense."""
    step: int | None = None
    """The furthest step a model call has reached (set by ``begin_step``)."""
    peak_bytes: int = 0
    """The most cache memory held at once so far (measured at each step's end: nothing is
    freed while a step runs)."""
    device: torch.device | None = None
    """The compute device the caches come from and are read on (with ``CachePlacement.CPU``)."""
    residual_sources: Callable[[int, int], int] | None = None
    """Without a schedule (calibration): the step whose residual a window strategy at (step,
    layer) reads, as the finished plan will say, so that calibration reads what Apply will."""

    @property
    def keeps_copies(self) -> bool:
        """Writes keep their own copy and reads hand out a fresh tensor (caches in CPU memory),
        so callers need not clone what they store or read."""
        return self.placement is CachePlacement.CPU

    # --- what to keep ---------------------------------------------------------------------
    def keeps_residual(self, step: int, layer: int, branch: int) -> bool:
        if self.schedule is None:
            return True
        return self.schedule.reads_residual_later(step, layer, branch)

    def keeps_output(self, step: int, layer: int) -> bool:
        if self.schedule is None:
            return True
        return self.schedule.next_is_ast(step, layer)

    def keeps_anything(self, step: int, layer: int) -> bool:
        """Whether this layer's call at ``step`` leaves anything a later step reads."""
        return (
            self.keeps_residual(step, layer, COND)
            or self.keeps_residual(step, layer, UNCOND)
            or self.keeps_output(step, layer)
        )

    # --- reads ------------------------------------------------------------------------------
    def residual(self, step: int, key: CacheKey, shape: torch.Size) -> torch.Tensor | None:
        """The residual for WA_RS at ``step``: written at or after the plan's FULL step."""
        entry = self.residuals.get(key)
        if entry is None or entry.tensor.shape != shape or entry.step >= step:
            return None
        source = self.residual_source(step, key.layer)
        if source is not None and entry.step < source:
            return None
        return self._fetch(entry.tensor)

    def residual_source(self, step: int, layer: int) -> int | None:
        """The FULL step whose residual a window strategy at ``step`` reads (-1: none yet;
        None: any earlier one, where neither a schedule nor ``residual_sources`` says)."""
        if self.schedule is not None:
            return self.schedule.residual_source(step, layer)
        if self.residual_sources is not None:
            return self.residual_sources(step, layer)
        return None

    def previous_output(self, step: int, key: CacheKey, shape: torch.Size) -> torch.Tensor | None:
        """This layer's output of the step right before ``step`` (AST), else None. Unless
        ``keeps_copies``, this is the kept tensor itself: a caller that hands it on must
        clone it."""
        tensor = self.outputs.get(key, {}).get(step - 1)
        if tensor is None or tensor.shape != shape:
            return None
        return self._fetch(tensor)

    def shared(self, step: int, layer: int, site: Hashable,
               shape: torch.Size | None) -> tuple[torch.Tensor, CacheKey] | None:
        """The conditional output, and its key, published by a separate cond call of the same
        call site at this very step; None if there is none, or several conds published one
        (``shape`` None: of any shape)."""
        entry = self.shared_cond.get((layer, site))
        if entry is None or entry.step != step or entry.source is None:
            return None
        if shape is not None and entry.tensor.shape != shape:
            return None
        return entry.tensor, entry.source

    # --- writes -----------------------------------------------------------------------------
    def put_residual(self, step: int, key: CacheKey, tensor: torch.Tensor) -> None:
        if not self.frozen:
            self.residuals[key] = _Entry(step, self._keep(tensor))

    def put_output(self, step: int, key: CacheKey, tensor: torch.Tensor) -> None:
        if not self.frozen:
            self.outputs.setdefault(key, {})[step] = self._keep(tensor)

    def alias_output(self, step: int, key: CacheKey, source: CacheKey) -> bool:
        """``key``'s output at ``step`` is ``source``'s (ASC: the unconditional rows copy the
        conditional ones): kept once for both. False if ``source`` kept nothing at ``step``."""
        tensor = self.outputs.get(source, {}).get(step)
        if tensor is None:
            return False
        if not self.frozen:
            self.outputs.setdefault(key, {})[step] = tensor
        return True

    def carry_output(self, step: int, key: CacheKey) -> None:
        """AST at ``step`` and again at the next: its output is the previous step's, kept
        once for both steps (no copy)."""
        per_step = self.outputs.get(key, {})
        if not self.frozen and step - 1 in per_step:
            per_step[step] = per_step[step - 1]

    def publish_cond(self, step: int, key: CacheKey, tensor: torch.Tensor) -> None:
        """A conditional-only call's output of ``key.layer`` for the separate unconditional call
        of the same site at this step (a second cond of the site at the step makes it ambiguous)."""
        if self.frozen:
            return
        slot = (key.layer, key.site)
        entry = self.shared_cond.get(slot)
        conflict = entry is not None and entry.step == step and entry.source != key  # None: already ambiguous
        self.shared_cond[slot] = _Shared(step, tensor, None if conflict else key)

    def count(self, what: str, n: int = 1) -> None:
        if not self.frozen and n:
            self.stats[what] += n

    def miss(self, what: str) -> None:
        self.misses += 1
        self.count(what)

    def miss_cache(self, cache: Cache, step: int, key: CacheKey) -> str:
        """Count a read of ``cache`` that found nothing at ``step``, under its reason; returns
        the name it was counted under."""
        name = f"{_MISS_PREFIX[cache]}_{self.miss_reason(cache, step, key)}"
        self.miss(name)
        if name.endswith("_no_site") and not self.frozen:
            self.site_misses[(name, key.site)] += 1
        return name

    def miss_reason(self, cache: Cache, step: int, key: CacheKey) -> str:
        """Why ``key`` found no ``cache`` entry at ``step``: ``skipped_step`` when no model call
        ran at the step it reads (a step cache such as EasyCache skipped it), ``no_site`` when
        calls ran there but none of this call site (context windows that shift between steps,
        a guidance call that starts later), ``outer`` when another attention override computed
        the layer at that step (``note_outer``), else ``miss`` (also where the caller records no
        calls: ``note_call``)."""
        if cache is Cache.SHARED_COND:
            return "miss"
        source = step - 1 if cache is Cache.OUTPUT else self.residual_source(step, key.layer)
        if source is not None and (key.site, key.layer) in self.outer.get(source, ()):
            return "outer"
        if not self.sites:
            return "miss"
        if source is None:  # any earlier residual would do
            earlier = [sites for s, sites in self.sites.items() if s < step]
            return "no_site" if earlier and not any(key.site in sites for sites in earlier) else "miss"
        if source < min(self.sites):
            return "miss"  # before this run's first step (split sampling), or no FULL step yet
        if source not in self.sites:
            return "skipped_step"
        return "no_site" if key.site not in self.sites[source] else "miss"

    # --- lifetime ---------------------------------------------------------------------------
    def note_outer(self, step: int, site: Hashable, layers: Iterable[int]) -> None:
        """Another attention override computed these layers of ``site`` at ``step`` (core
        Model Sparse Attention): what ``miss_reason`` tells their misses by."""
        if not self.frozen:
            self.outer.setdefault(step, set()).update((site, layer) for layer in layers)

    def note_call(self, step: int, site: Hashable) -> None:
        """A model call of ``site`` runs at ``step`` (what ``miss_reason`` tells misses by)."""
        self.sites.setdefault(step, set()).add(site)

    def begin_step(self, step: int) -> None:
        """A model call of ``step`` starts. When it is the furthest step reached so far, free
        what no call of the step before it, or of a later one, reads: samplers look one step
        ahead and come back (heunpp2 evaluates at sigma i+2 while at step i, then continues
        at i+1), never further. Read-only forwards free nothing."""
        if self.frozen or (self.step is not None and step <= self.step):
            return
        self.step = step
        self.note_peak()
        oldest = step - 1
        for key in list(self.outputs):
            kept = {s: t for s, t in self.outputs[key].items() if s >= oldest - 1 and self._reads_output(s, key)}
            if kept:
                self.outputs[key] = kept
            else:
                del self.outputs[key]
        if self.schedule is not None:
            dead = [k for k in self.residuals if not self.schedule.reads_residual_from(max(oldest, 0), k.layer, k.branch)]
            for key in dead:
                del self.residuals[key]
        for slot in [k for k, e in self.shared_cond.items() if e.step < oldest]:
            del self.shared_cond[slot]

    def _keep(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.placement is CachePlacement.DEVICE:
            return tensor
        self.device = tensor.device
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.is_cuda)
        return host.copy_(tensor, non_blocking=tensor.is_cuda)

    def _fetch(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.placement is CachePlacement.DEVICE or self.device is None:
            return tensor
        return tensor.to(self.device, non_blocking=True, copy=True)

    def _reads_output(self, step: int, key: CacheKey) -> bool:
        return self.schedule is None or self.schedule.next_is_ast(step, key.layer)

    @contextlib.contextmanager
    def read_only(self) -> Iterator[None]:
        """Trial forwards: read caches, write nothing."""
        previous, self.frozen = self.frozen, True
        try:
            yield
        finally:
            self.frozen = previous

    def reset(self) -> None:
        self.residuals.clear()
        self.outputs.clear()
        self.shared_cond.clear()
        self.stats.clear()
        self.sites.clear()
        self.outer.clear()
        self.site_misses.clear()
        self.frozen = False
        self.misses = 0
        self.step = None
        self.peak_bytes = 0

    def note_peak(self) -> None:
        """Record the cache memory held now if it is the most so far."""
        self.peak_bytes = max(self.peak_bytes, self.cache_bytes())

    def cache_bytes(self) -> int:
        tensors = {id(t): t for per_step in self.outputs.values() for t in per_step.values()}
        tensors.update((id(e.tensor), e.tensor) for d in (self.residuals, self.shared_cond) for e in d.values())
        return sum(t.numel() * t.element_size() for t in tensors.values())


_MISS_PREFIX = {Cache.OUTPUT: "ast", Cache.RESIDUAL: "residual", Cache.SHARED_COND: "asc"}
"""The name a strategy's miss of each cache is counted under (``ast_miss``, ``residual_no_site``, ...)."""
