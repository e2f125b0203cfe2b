"""The strategy table of a plan (steps x layers) and what it implies ahead of time."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from .strategies import COND, UNCOND, Strategy


@dataclass(frozen=True)
class Schedule:
    """``rows[step][layer]`` is the strategy of that layer at that step."""

    rows: tuple[tuple[Strategy, ...], ...]
    _reads_later: dict = field(init=False, repr=False, compare=False, hash=False)
    _source: dict = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not self.rows or not self.rows[0]:
            raise ValueError("a schedule needs at least one step and one layer")
        width = len(self.rows[0])
        for step, row in enumerate(self.rows):
            if len(row) != width:
                raise ValueError(f"step {step} has {len(row)} layers, step 0 has {width}")
        reads_later: dict[tuple[int, int, int], bool] = {}
        source: dict[tuple[int, int], int] = {}
        for layer in range(width):
            pending = {COND: False, UNCOND: False}
            for step in range(len(self.rows) - 1, -1, -1):
                s = self.rows[step][layer]
                for branch in (COND, UNCOND):
                    reads_later[(step, layer, branch)] = pending[branch]
                if s.refreshes_residual:
                    pending = {COND: False, UNCOND: False}
                for branch in (COND, UNCOND):
                    pending[branch] = pending[branch] or s.reads_residual(branch)
            last_full = -1
            for step in range(len(self.rows)):
                source[(step, layer)] = last_full
                if self.rows[step][layer].refreshes_residual:
                    last_full = step
        object.__setattr__(self, "_reads_later", reads_later)
        object.__setattr__(self, "_source", source)

    @classmethod
    def from_letters(cls, steps: Sequence[str]) -> Schedule:
        return cls(tuple(tuple(Strategy.from_letter(ch) for ch in row) for row in steps))

    @classmethod
    def uniform(cls, steps: int, layers: int, strategy: Strategy = Strategy.FULL) -> Schedule:
        return cls(tuple((strategy,) * layers for _ in range(steps)))

    def to_letters(self) -> list[str]:
        return ["".join(s.letter for s in row) for row in self.rows]

    @property
    def steps(self) -> int:
        return len(self.rows)

    @property
    def layers(self) -> int:
        return len(self.rows[0])

    def __getitem__(self, step: int) -> tuple[Strategy, ...]:
        return self.rows[step]

    def problems(self) -> list[str]:
        """Steps whose strategy can never be valid: AST at step 0, WA_RS before any FULL."""
        out = []
        for layer in range(self.layers):
            if self.rows[0][layer].reads_previous_output:
                out.append(f"layer {layer} uses AST at step 0 (there is no previous step)")
            for step in range(self.steps):
                s = self.rows[step][layer]
                if s.reads_window_residual and self._source[(step, layer)] < 0:
                    out.append(
                        f"layer {layer} uses {s.name} at step {step} before any FULL step "
                        "(no residual exists yet)"
                    )
                    break
        return out

    def reads_residual_later(self, step: int, layer: int, branch: int) -> bool:
        """Does a later step read this layer's ``branch`` residual before its next FULL? (A
        guider's extra conds, branch 2+, read theirs as the conditional branch does.)"""
        return self._reads_later.get((step, layer, UNCOND if branch == UNCOND else COND), False)

    def reads_residual_from(self, step: int, layer: int, branch: int) -> bool:
        """Does ``step`` or a later step read this layer's ``branch`` residual (before the
        FULL step after them refreshes it)?"""
        if step >= self.steps:
            return False
        return self.rows[step][layer].reads_residual(branch) or self.reads_residual_later(step, layer, branch)

    def residual_source(self, step: int, layer: int) -> int:
        """The FULL step whose residual a WA_RS step reads (-1: none)."""
        return self._source.get((step, layer), -1)

    def next_is_ast(self, step: int, layer: int) -> bool:
        return step + 1 < self.steps and self.rows[step + 1][layer].reads_previous_output

    def counts(self) -> Counter:
        return Counter(s for row in self.rows for s in row)
