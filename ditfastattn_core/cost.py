"""Attention FLOPs per strategy and per plan, in units of one dense attention.

FLOPs are the QK^T and PV multiplies of the compressed self-attention, as in the paper.
One call's cost is a column of the strategy table (``Strategy.cost``). A window costs the
keys each query really sees (``Window.fraction``, text keys and border effects included); the
reference code counts windows as free, which flatters every plan.
A FULL step that refreshes a residual also pays for the window it subtracts. Sol-Attn (letter
S) costs its kept fraction on the layout (``sparse.cost_fraction``: exact keys, pooled blocks and
routing, and dense where that saves nothing).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from .schedule import Schedule
from .strategies import COND, UNCOND, Strategy


def refresh_cost(schedule: Schedule, step: int, layer: int, window_fraction: float, has_cfg: bool) -> float:
    """Window FLOPs a FULL step spends to refresh residuals that later steps read."""
    if not schedule[step][layer].refreshes_residual:
        return 0.0
    branches = (COND, UNCOND) if has_cfg else (COND,)
    reads = [schedule.reads_residual_later(step, layer, b) for b in branches]
    return window_fraction * sum(reads) / len(reads)


@dataclass(frozen=True)
class CostSummary:
    """A plan in the paper's terms."""

    attention_flops: float
    """Mean attention FLOPs over all (step, layer) calls, as a fraction of all-FULL."""
    counts: dict[str, int]
    window_fraction: float
    sparse_fraction: float = 1.0
    """What one Sol-Attn call costs (letter S); 1.0 where it saves nothing."""

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v}" for k, v in self.counts.items() if v)
        sparse = f"; Sol-Attn {self.sparse_fraction:.1%}" if self.counts.get(Strategy.SPARSE.name) else ""
        return (f"attention FLOPs {self.attention_flops:.1%} of FULL ({parts}; window {self.window_fraction:.1%}"
                f"{sparse})")


def summarize(schedule: Schedule, window_fraction: float, has_cfg: bool, sparse_fraction: float = 1.0) -> CostSummary:
    total = 0.0
    for step in range(schedule.steps):
        for layer in range(schedule.layers):
            total += schedule[step][layer].cost(window_fraction, has_cfg, sparse_fraction)
            total += refresh_cost(schedule, step, layer, window_fraction, has_cfg)
    counts: Counter = schedule.counts()
    return CostSummary(
        attention_flops=total / (schedule.steps * schedule.layers),
        counts={s.name: counts.get(s, 0) for s in Strategy},
        window_fraction=window_fraction,
        sparse_fraction=sparse_fraction,
    )
