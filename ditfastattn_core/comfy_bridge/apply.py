"""Apply a plan: its config, its run, and the checks made before sampling."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..kernels import usable_kernel
from ..plan import Plan
from ..state import RunState
from ..steps import STRICT, StepMapper, check_step_mode
from ..strategies import Strategy
from .families import Geometry
from .install import install, model_geometry
from .run import Run, check_window


class PlanMismatchError(ValueError):
    """The plan was made for another model or other sampling settings."""


@dataclass(frozen=True)
class ApplyConfig:
    """Apply ``plan``: kept in the patched model's options (immutable; clones share it)."""

    plan: Plan
    geometry: Geometry
    kernel: str = "auto"
    step_mode: str = STRICT

    def start_run(self, sample_sigmas: torch.Tensor, latent_shape: tuple[int, ...]) -> ApplyRun:
        return ApplyRun.start(self, sample_sigmas, latent_shape)


class ApplyRun(Run):
    """A sampling run with a plan: each layer's strategy is the plan's."""

    def __init__(self, config: ApplyConfig, steps: StepMapper) -> None:
        plan = config.plan
        super().__init__(config.geometry, plan.window, config.kernel, steps, RunState(plan.schedule),
                         plan_grid=plan.grid, module_outputs=True)
        self.plan = plan

    @classmethod
    def start(cls, config: ApplyConfig, sample_sigmas: torch.Tensor, latent_shape: tuple[int, ...]) -> ApplyRun:
        """The run, after checking what can be known before the first model call: the run's
        schedule against the plan's, the window against the latent."""
        plan = config.plan
        if any(s.uses_window for s in plan.schedule.counts()):
            check_window(config.geometry, plan.window, latent_shape,
                         "use a plan calibrated with a window for this kind of latent")
        sigmas = [float(s) for s in sample_sigmas.tolist()]
        run = cls(config, StepMapper.for_run(plan.sigmas, sigmas, config.step_mode))
        if not run.steps.by_sigma:
            run.explain_schedule_mismatch(sigmas)
        return run

    def strategy(self, step: int, layer: int) -> Strategy:
        return self.state.schedule[step][layer]

    def explain_schedule_mismatch(self, sigmas: list[float]) -> None:
        plan = self.plan
        if len(sigmas) != len(plan.sigmas):
            return  # normalised step matching: the schedules differ by design
        worst = max(abs(a - b) / max(abs(b), 1e-6) for a, b in zip(sigmas[:-1], plan.sigmas[:-1], strict=True))
        if worst > 0.05:
            self.report("sigmas", (
                f"this run's noise schedule differs from the plan's by up to {worst:.0%} (plan: "
                f"{plan.sampler or '?'} / {plan.scheduler or '?'}, denoise {plan.denoise:g}); the plan "
                "applies by step, but recalibrate for these settings for the quality it was made for"))


def check_plan(model: Any, plan: Plan, geometry: Geometry | None = None) -> Geometry:
    """The model's geometry, after checking that ``plan`` was made for this model."""
    geometry = geometry or model_geometry(model)
    if plan.family != geometry.family:
        raise PlanMismatchError(
            f"the plan is for a {plan.family} model but this is a {geometry.label} ({geometry.family}) model: "
            "load the plan made for this model, or calibrate one with Calibrate FastAttn Plan"
        )
    if plan.layers != geometry.layers:
        raise PlanMismatchError(
            f"the plan has {plan.layers} attention layers but this {geometry.label} model has "
            f"{geometry.layers}: it was calibrated on another model size; recalibrate for this model"
        )
    return geometry


def apply_fastattn(model: Any, plan: Plan, kernel: str = "auto", step_mode: str = STRICT) -> Any:
    """A clone of ``model`` (a ModelPatcher) that samples with ``plan``."""
    check_step_mode(step_mode)
    geometry = check_plan(model, plan)
    config = ApplyConfig(plan=plan, geometry=geometry, kernel=usable_kernel(kernel, model.load_device),
                         step_mode=step_mode)
    return install(model, config)
