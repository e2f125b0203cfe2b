"""Per-run caches: window residuals, previous outputs, and conditional outputs shared with
the unconditional branch.

One ``RunState`` lives for one sampling run (the sampler hook creates it and calls
``reset()`` in ``finally``). Entries are keyed per (layer, CFG branch, occurrence) and hold
all sample rows of that chunk; every entry records the step that wrote it, so a reader can
tell a valid entry from a stale one (a skipped model call, another sample, another step).

With a ``schedule`` (the plan's strategies) the state looks ahead and keeps only what a
later step will read. Without one (calibration, where the future is being decided) it keeps
everything a candidate could read.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .schedule import Schedule

Key = tuple[int, int, int]
"""(layer, branch, occurrence)"""


@dataclass
class _Entry:
    step: int
    tensor: torch.Tensor


@dataclass
class RunState:
    schedule: Schedule | None = None
    residuals: dict[Key, _Entry] = field(default_factory=dict)
    outputs: dict[Key, _Entry] = field(default_factory=dict)
    shared_cond: dict[int, _Entry] = field(default_factory=dict)
    stats: Counter = field(default_factory=Counter)
    frozen: bool = False
    """While frozen (calibration trial forwards) nothing is written; reads still work."""
    misses: int = 0
    """Cache misses (a strategy that fell back), counted even while frozen: calibration
    uses it to reject a candidate that only looked good because it silently ran dense."""

    # --- what to keep ---------------------------------------------------------------------
    def keeps_residual(self, step: int, layer: int, branch: int) -> bool:
        if self.schedule is None:
            return True
        return self.schedule.reads_residual_later(step, layer, branch)

    def keeps_output(self, step: int, layer: int) -> bool:
        if self.schedule is None:
            return True
        return self.schedule.next_is_ast(step, layer)

    # --- reads ------------------------------------------------------------------------------
    def residual(self, step: int, key: Key, shape: torch.Size) -> torch.Tensor | None:
        """The residual for WA_RS at ``step``: written at or after the plan's FULL step."""
        entry = self.residuals.get(key)
        if entry is None or entry.tensor.shape != shape or entry.step >= step:
            return None
        if self.schedule is not None and entry.step < self.schedule.residual_source(step, key[0]):
            return None
        return entry.tensor

    def previous_output(self, step: int, key: Key, shape: torch.Size) -> torch.Tensor | None:
        """This layer's output of the step right before ``step`` (AST), else None."""
        entry = self.outputs.get(key)
        if entry is None or entry.step != step - 1 or entry.tensor.shape != shape:
            return None
        return entry.tensor

    def shared(self, step: int, layer: int, shape: torch.Size) -> torch.Tensor | None:
        """The conditional output published by a separate cond call at this very step."""
        entry = self.shared_cond.get(layer)
        if entry is None or entry.step != step or entry.tensor.shape != shape:
            return None
        return entry.tensor

    # --- writes -----------------------------------------------------------------------------
    def put_residual(self, step: int, key: Key, tensor: torch.Tensor) -> None:
        if not self.frozen:
            self.residuals[key] = _Entry(step, tensor)

    def drop_residual(self, key: Key) -> None:
        if not self.frozen:
            self.residuals.pop(key, None)

    def put_output(self, step: int, key: Key, tensor: torch.Tensor) -> None:
        if not self.frozen:
            self.outputs[key] = _Entry(step, tensor)

    def drop_output(self, key: Key) -> None:
        if not self.frozen:
            self.outputs.pop(key, None)

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

    def cache_bytes(self) -> int:
        tensors = [e.tensor for d in (self.residuals, self.outputs) for e in d.values()]
        tensors += [e.tensor for e in self.shared_cond.values()]
        return sum(t.numel() * t.element_size() for t in tensors)
