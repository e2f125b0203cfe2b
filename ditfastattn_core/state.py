"""Per-run caches: window residuals, previous outputs, and conditional outputs shared with
the unconditional branch.

One ``RunState`` lives for one sampling run (the sampler hook creates it and calls
``reset()`` in ``finally``). Entries are keyed per (layer, CFG branch, occurrence) and hold
all sample rows of that chunk; every entry records the step that wrote it, so a reader can
tell a valid entry from a stale one (a skipped model call, another sample, another step).

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
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .schedule import Schedule
from .strategies import COND, UNCOND

Key = tuple[int, int, int]
"""(layer, branch, occurrence)"""


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
class RunState:
    schedule: Schedule | None = None
    placement: CachePlacement = CachePlacement.DEVICE
    residuals: dict[Key, _Entry] = field(default_factory=dict)
    outputs: dict[Key, dict[int, torch.Tensor]] = field(default_factory=dict)
    """Per key, the output stored at each step a call may still read (see ``begin_step``)."""
    shared_cond: dict[int, _Entry] = field(default_factory=dict)
    stats: Counter = field(default_factory=Counter)
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
    def residual(self, step: int, key: Key, shape: torch.Size) -> torch.Tensor | None:
        """The residual for WA_RS at ``step``: written at or after the plan's FULL step."""
        entry = self.residuals.get(key)
        if entry is None or entry.tensor.shape != shape or entry.step >= step:
            return None
        if self.schedule is not None and entry.step < self.schedule.residual_source(step, key[0]):
            return None
        return self._fetch(entry.tensor)

    def previous_output(self, step: int, key: Key, shape: torch.Size) -> torch.Tensor | None:
        """This layer's output of the step right before ``step`` (AST), else None. Unless
        ``keeps_copies``, this is the kept tensor itself: a caller that hands it on must
        clone it."""
        tensor = self.outputs.get(key, {}).get(step - 1)
        if tensor is None or tensor.shape != shape:
            return None
        return self._fetch(tensor)

    def shared(self, step: int, layer: int, shape: torch.Size) -> torch.Tensor | None:
        """The conditional output published by a separate cond call at this very step."""
        entry = self.shared_cond.get(layer)
        if entry is None or entry.step != step or entry.tensor.shape != shape:
            return None
        return entry.tensor

    # --- writes -----------------------------------------------------------------------------
    def put_residual(self, step: int, key: Key, tensor: torch.Tensor) -> None:
        if not self.frozen:
            self.residuals[key] = _Entry(step, self._keep(tensor))

    def put_output(self, step: int, key: Key, tensor: torch.Tensor) -> None:
        if not self.frozen:
            self.outputs.setdefault(key, {})[step] = self._keep(tensor)

    def alias_output(self, step: int, key: Key, source: Key) -> bool:
        """``key``'s output at ``step`` is ``source``'s (ASC: the unconditional rows copy the
        conditional ones): kept once for both. False if ``source`` kept nothing at ``step``."""
        tensor = self.outputs.get(source, {}).get(step)
        if tensor is None:
            return False
        if not self.frozen:
            self.outputs.setdefault(key, {})[step] = tensor
        return True

    def carry_output(self, step: int, key: Key) -> None:
        """AST at ``step`` and again at the next: its output is the previous step's, kept
        once for both steps (no copy)."""
        per_step = self.outputs.get(key, {})
        if not self.frozen and step - 1 in per_step:
            per_step[step] = per_step[step - 1]

    def publish_cond(self, step: int, layer: int, tensor: torch.Tensor) -> None:
        if not self.frozen:
            self.shared_cond[layer] = _Entry(step, tensor)

    def count(self, what: str) -> None:
        if not self.frozen:
            self.stats[what] += 1

    def miss(self, what: str) -> None:
        self.misses += 1
        self.count(what)

    # --- lifetime ---------------------------------------------------------------------------
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
            dead = [k for k in self.residuals if not self.schedule.reads_residual_from(max(oldest, 0), k[0], k[1])]
            for key in dead:
                del self.residuals[key]
        for layer in [k for k, e in self.shared_cond.items() if e.step < oldest]:
            del self.shared_cond[layer]

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

    def _reads_output(self, step: int, key: Key) -> bool:
        return self.schedule is None or self.schedule.next_is_ast(step, key[0])

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
