"""Which plan step a model call belongs to, from its sigma.

Samplers call the model at the schedule's sigmas, but also twice per step (heun: the
corrector runs at the next step's sigma), at sigmas between steps (dpmpp_2s_ancestral), or on
a schedule of another length. The mapping is deterministic: a call at a schedule sigma maps
to that step; a call at any other sigma maps to None, which runs FULL and caches nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

STRICT = "strict"
NORMALISED = "normalised"
STEP_MODES = (STRICT, NORMALISED)
REL_TOL = 1e-4


class StepCountError(ValueError):
    """The run's schedule has another number of steps than the plan, in strict mode."""


@dataclass(frozen=True)
class StepMapper:
    run_sigmas: tuple[float, ...]
    """The sampling run's schedule (ComfyUI's ``sample_sigmas``), steps + 1 values."""
    plan_steps: int
    mode: str = STRICT

    def __post_init__(self) -> None:
        if self.mode not in STEP_MODES:
            raise ValueError(f"step mode must be one of {STEP_MODES}, got {self.mode!r}")
        run_steps = len(self.run_sigmas) - 1
        if self.mode == STRICT and run_steps != self.plan_steps:
            raise StepCountError(
                f"the plan was calibrated for {self.plan_steps} steps but this run samples "
                f"{run_steps}: set the sampler to {self.plan_steps} steps, recalibrate, or set "
                f"Apply FastAttn's step matching to '{NORMALISED}'"
            )

    @classmethod
    def for_run(cls, run_sigmas: Sequence[float], plan_steps: int, mode: str = STRICT) -> StepMapper:
        return cls(tuple(float(s) for s in run_sigmas), plan_steps, mode)

    def run_step(self, sigma: float) -> int | None:
        """Index of ``sigma`` in the run's schedule, if it is one of its model-call sigmas."""
        for i, s in enumerate(self.run_sigmas[:-1]):
            if math.isclose(s, sigma, rel_tol=REL_TOL, abs_tol=1e-7):
                return i
        return None

    def plan_step(self, sigma: float) -> int | None:
        i = self.run_step(sigma)
        if i is None:
            return None
        if self.mode == STRICT:
            return i
        run_steps = len(self.run_sigmas) - 1
        if run_steps <= 1 or self.plan_steps <= 1:
            return 0
        return round(i * (self.plan_steps - 1) / (run_steps - 1))
