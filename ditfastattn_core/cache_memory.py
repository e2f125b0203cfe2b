"""How much cache memory a plan holds, known before sampling.

The estimate runs the engine itself over the plan on tiny stand-in tensors: every step,
every layer, one model call with both CFG branches,
the way ComfyUI batches them, counting the tensors the run's caches hold; every cached tensor
is one layer's attention output for one CFG branch. It is therefore the engine's own
bookkeeping, not a model of it, and it is exact for such runs: ``RunState.peak_bytes`` of a real run with that batch and
resolution measures the same number (the tests and ``bench/techniques.py`` check it).
Samplers with several model calls per step hold at most one more step's outputs.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .context import CallContext
from .engine import attend
from .schedule import Schedule
from .state import CachePlacement, RunState
from .strategies import COND, UNCOND
from .window import TokenLayout, WindowSpec


@dataclass(frozen=True)
class AttentionSize:
    """One compressible attention call's output per sample: ``tokens`` x ``width`` values
    (``tokens`` counts every token in the call, text included; ``width`` is heads x head dim)."""

    tokens: int
    width: int

    def at_grid(self, calibrated: tuple[int, ...], grid: tuple[int, ...]) -> AttentionSize:
        """The same model at another image size: the image tokens change, the others stay."""
        return AttentionSize(self.tokens - math.prod(calibrated) + math.prod(grid), self.width)


@dataclass(frozen=True)
class CacheEstimate:
    peak_bytes: int
    peak_step: int
    """The step at whose end the most is held."""
    entry_bytes: int
    """One cached tensor: one layer, one CFG branch."""
    placement: CachePlacement
    windows: int | None = None
    """Under context windows: the windows whose caches the peak holds (each keeps its own)."""
    exact: bool = True
    """False where the figure is an upper bound (context windows that shift between steps)."""

    def describe(self) -> str:
        where = "on the compute device" if self.placement is CachePlacement.DEVICE else "in CPU memory"
        if self.windows is not None:
            bound = "" if self.exact else "at most "
            return (f"caches: peak {bound}{format_bytes(self.peak_bytes)} {where} for {self.windows} context "
                    f"windows, each with caches of its own (up to {format_bytes(self.entry_bytes)} a tensor)")
        return (f"caches: peak {format_bytes(self.peak_bytes)} {where} after step {self.peak_step} "
                f"({self.peak_bytes // max(self.entry_bytes, 1)} x {format_bytes(self.entry_bytes)})")


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


@functools.lru_cache(maxsize=64)
def peak_entries(schedule: Schedule, cfg: bool) -> tuple[int, int]:
    """(the most cached tensors held at once, the step at whose end that happens) when
    ``schedule`` samples with or without CFG: the engine's own run on stand-in tensors.

    Which tensors a run keeps depends on the strategies only, never on the tensors' sizes
    or the window's shape, so the run uses one channel on an 8 x 8 grid on the CPU:
    microseconds per layer and step, at any resolution."""
    branches = (COND, UNCOND) if cfg else (COND,)
    tokens = TokenLayout.image_only((8, 8))
    q = torch.zeros(len(branches), 1, tokens.seq_len, 1)
    entry = tokens.seq_len * q.element_size()
    state = RunState(schedule)
    peak, peak_step = 0, 0
    for step in range(schedule.steps):
        state.begin_step(step)
        ctx = CallContext(step, branches, tokens, WindowSpec())
        for layer in range(schedule.layers):
            attend(q, q, q, schedule[step][layer], layer, ctx, state)
        held = state.cache_bytes() // entry
        if held > peak:
            peak, peak_step = held, step
    return peak, peak_step


def estimate_cache_memory(
    schedule: Schedule,
    size: AttentionSize,
    *,
    batch: int = 1,
    cfg: bool = True,
    dtype: torch.dtype = torch.float16,
    placement: CachePlacement = CachePlacement.DEVICE,
) -> CacheEstimate:
    """Peak cache bytes of sampling ``batch`` latents whose attention calls have ``size``
    with ``schedule`` (see the module docstring)."""
    entries, step = peak_entries(schedule, cfg)
    entry = batch * size.tokens * size.width * torch.empty((), dtype=dtype).element_size()
    return CacheEstimate(entries * entry, step, entry, placement)
