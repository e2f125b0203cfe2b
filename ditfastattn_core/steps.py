"""Which plan step a model call belongs to, from its sigma.

A plan keeps the sigma schedule it was calibrated on. When the run's schedule is that
schedule or a contiguous range of it (the same sampler settings; KSamplerAdvanced start/end
steps; denoise < 1, which samples the tail of a longer schedule), every model call is matched
against the plan's sigmas directly. Samplers call the model at the schedule's sigmas, but
also twice per step (heun's corrector, dpmpp_2s_ancestral's second evaluation: both at the
next step's sigma, so both belong to that step) or between steps (dpm_2, heunpp2 midpoints):
a call at a schedule sigma maps to that step, a call at any other sigma maps to None, which
runs FULL and caches nothing.

A sigma matches a schedule sigma when it is within a small fraction of the log-sigma gap to
its neighbours: ancestral samplers recompute the next sigma with cancellation (float32 errors
of 1e-4 and more), while two distinct steps are never that close.

When the run's schedule is not a range of the plan's, the plan applies by position: strict
mode needs the same number of steps, normalised mode spreads the run's steps over the plan.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

STRICT = "strict"
NORMALISED = "normalised"
STEP_MODES = (STRICT, NORMALISED)
GAP_FRACTION = 0.05
"""A call matches a schedule sigma within this fraction of the log-sigma gap to its neighbours."""
MIN_LOG_TOL = 1e-4


class StepCountError(ValueError):
    """The run's schedule cannot be mapped onto the plan's, in strict mode."""


def match_sigma(schedule: Sequence[float], sigma: float) -> int | None:
    """Index of the model-call sigma of ``schedule`` (all but its last value) that ``sigma``
    is, or None when it lies between them."""
    if not sigma > 0:
        return None
    logs = [math.log(s) if s > 0 else -math.inf for s in schedule]
    target = math.log(sigma)
    best, best_dist = None, math.inf
    for i in range(len(schedule) - 1):
        if logs[i] == -math.inf:
            continue
        dist = abs(logs[i] - target)
        if dist < best_dist:
            best, best_dist = i, dist
    if best is None:
        return None
    gaps = [abs(logs[best] - logs[j]) for j in (best - 1, best + 1) if 0 <= j < len(schedule)]
    gap = min((g for g in gaps if g > 0), default=math.inf)
    return best if best_dist <= max(MIN_LOG_TOL, GAP_FRACTION * gap) else None


def range_offset(plan_sigmas: Sequence[float], run_sigmas: Sequence[float]) -> int | None:
    """Where the run's model-call sigmas start in the plan's schedule, when they are a
    contiguous range of it; None otherwise. The run's last sigma (the one it ends at) may be
    anything: a split run that denoises fully ends at 0 instead of the plan's next sigma."""
    calls = list(run_sigmas[:-1])
    if not calls:
        return None
    first = match_sigma(plan_sigmas, calls[0])
    if first is None or first + len(calls) > len(plan_sigmas) - 1:
        return None
    for j, s in enumerate(calls):
        if match_sigma(plan_sigmas, s) != first + j:
            return None
    return first


def check_step_mode(mode: str) -> None:
    if mode not in STEP_MODES:
        raise ValueError(f"step mode must be one of {STEP_MODES}, got {mode!r}")


@dataclass(frozen=True)
class StepMapper:
    plan_sigmas: tuple[float, ...]
    """The plan's schedule, plan steps + 1 values."""
    run_sigmas: tuple[float, ...]
    """The sampling run's schedule (ComfyUI's ``sample_sigmas``), run steps + 1 values."""
    mode: str = STRICT
    offset: int | None = None
    """Where the run's schedule starts in the plan's; None when it is not a range of it."""

    def __post_init__(self) -> None:
        check_step_mode(self.mode)
        if self.offset is None and self.mode == STRICT and self.run_steps != self.plan_steps:
            raise StepCountError(
                f"the plan was calibrated for {self.plan_steps} steps (sigma "
                f"{self.plan_sigmas[0]:.4g} to {self.plan_sigmas[-1]:.4g}) but this run samples "
                f"{self.run_steps} steps (sigma {self.run_sigmas[0]:.4g} to {self.run_sigmas[-1]:.4g}) "
                "that are not a range of the plan's schedule: sample with the plan's steps, "
                "scheduler and denoise (a KSamplerAdvanced start/end range of them is fine), "
                f"recalibrate, or set Apply FastAttn's step matching to '{NORMALISED}'"
            )

    @classmethod
    def for_run(cls, plan_sigmas: Sequence[float], run_sigmas: Sequence[float], mode: str = STRICT) -> StepMapper:
        plan = tuple(float(s) for s in plan_sigmas)
        run = tuple(float(s) for s in run_sigmas)
        return cls(plan, run, mode, range_offset(plan, run))

    @property
    def plan_steps(self) -> int:
        return len(self.plan_sigmas) - 1

    @property
    def run_steps(self) -> int:
        return len(self.run_sigmas) - 1

    @property
    def by_sigma(self) -> bool:
        """The run samples (part of) the plan's own schedule."""
        return self.offset is not None

    @property
    def plan_range(self) -> range:
        """The plan steps this run's schedule covers (all of them when mapped by position)."""
        if self.offset is None:
            return range(self.plan_steps)
        return range(self.offset, self.offset + self.run_steps)

    def plan_step(self, sigma: float) -> int | None:
        if self.by_sigma:
            return match_sigma(self.plan_sigmas, sigma)
        i = match_sigma(self.run_sigmas, sigma)
        if i is None or self.mode == STRICT:
            return i
        if self.run_steps <= 1 or self.plan_steps <= 1:
            return 0
        return round(i * (self.plan_steps - 1) / (self.run_steps - 1))
