"""Apply a plan: its config, its run, and the checks made before sampling."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..cache_memory import CacheEstimate, format_bytes
from ..kernels import usable_kernel
from ..plan import Plan
from ..state import CachePlacement, RunState
from ..steps import STRICT, StepMapper, check_step_mode
from ..strategies import Strategy
from .call_sites import context_windows
from .families import Geometry
from .install import install, model_geometry
from .run import Run, check_window, log


class PlanMismatchError(ValueError):
    """The plan was made for another model or other sampling settings."""


@dataclass(frozen=True)
class ApplyConfig:
    """Apply ``plan``: kept in the patched model's options (immutable; clones share it)."""

    plan: Plan
    geometry: Geometry
    kernel: str = "auto"
    step_mode: str = STRICT
    cache_placement: CachePlacement = CachePlacement.DEVICE
    dtype: torch.dtype = torch.float16
    """The model's compute dtype: the caches hold it."""

    def cache_estimate(self, latent_shape: tuple[int, ...],
                       model_options: Mapping[str, Any] | None = None) -> CacheEstimate | None:
        """The plan's peak cache memory when sampling this latent (batch and size); None
        where the plan does not know its attention size or the latent cannot be placed.

        Under context windows each window is a call site with caches of its own, at the
        window's size: the estimate adds up the windows alive at two consecutive steps (a
        step reads the previous one's), exact when the windows stay put (static schedules),
        an upper bound when they shift."""
        windows = context_windows(model_options or {}, tuple(latent_shape), self.plan.steps)
        if windows is None:
            return self._estimate_at(tuple(latent_shape))
        dim = model_options["context_handler"].dim
        exact = all(w == windows[0] for w in windows)  # the windows stay put
        per_window: dict[int, CacheEstimate | None] = {}
        worst: CacheEstimate | None = None
        for step in range(len(windows)):
            alive = set(windows[step]) | set(windows[step - 1] if step else ())
            total, entry, peak_step = 0, 0, 0
            for frames in alive:
                size = len(frames)
                if size not in per_window:
                    shape = list(latent_shape)
                    shape[dim] = size
                    per_window[size] = self._estimate_at(tuple(shape))
                one = per_window[size]
                if one is None:
                    return None
                total, entry, peak_step = total + one.peak_bytes, max(entry, one.entry_bytes), one.peak_step
            if worst is None or total > worst.peak_bytes:
                worst = CacheEstimate(total, peak_step, entry, self.cache_placement,
                                      windows=len(alive), exact=exact)
        return worst

    def _estimate_at(self, latent_shape: tuple[int, ...]) -> CacheEstimate | None:
        try:
            grid = self.geometry.grid(self.geometry.latent_shape(tuple(latent_shape), {}))
        except ValueError:
            return None
        return self.plan.cache_estimate(grid, batch=latent_shape[0], dtype=self.dtype,
                                        placement=self.cache_placement)

    def describe_caches(self, latent_shape: tuple[int, ...] | None = None,
                        model_options: Mapping[str, Any] | None = None) -> str:
        """One line for the node: the peak cache memory at this latent's size and batch (and
        its context windows), else at the plan's calibration size and batch 1."""
        if self.plan.attention is None:
            return "caches: size unknown (the plan does not record its attention size: recalibrate to see it)"
        if latent_shape is None:
            estimate = self.plan.cache_estimate(dtype=self.dtype, placement=self.cache_placement)
            where = f"at the plan's size {_grid_text(self.plan.grid)}, batch 1"
            if (model_options or {}).get("context_handler") is not None:
                where += " and one call (the model has context windows, each with caches of its own: connect the latent)"
        else:
            estimate = self.cache_estimate(latent_shape, model_options)
            where = f"for the latent {list(latent_shape)}"
        if estimate is None:
            return f"caches: size unknown for the latent {list(latent_shape)}"
        if not estimate.peak_bytes:
            return "caches: none (the plan caches nothing)"
        return f"{estimate.describe()}, {where}"

    def start_run(self, sample_sigmas: torch.Tensor, latent_shape: tuple[int, ...],
                  model_options: Mapping[str, Any] | None = None) -> ApplyRun:
        return ApplyRun.start(self, sample_sigmas, latent_shape, model_options)


class ApplyRun(Run):
    """A sampling run with a plan: each layer's strategy is the plan's."""

    def __init__(self, config: ApplyConfig, steps: StepMapper) -> None:
        plan = config.plan
        super().__init__(config.geometry, plan.window, config.kernel, steps,
                         RunState(plan.schedule, config.cache_placement), plan_grid=plan.grid, module_outputs=True)
        self.plan = plan
        self.estimate: CacheEstimate | None = None

    @classmethod
    def start(cls, config: ApplyConfig, sample_sigmas: torch.Tensor, latent_shape: tuple[int, ...],
              model_options: Mapping[str, Any] | None = None) -> ApplyRun:
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
        run.estimate = config.cache_estimate(latent_shape, model_options)
        if run.estimate is not None and run.estimate.peak_bytes:
            log.info("FastAttn %s", run.estimate.describe())
        return run

    def finish(self) -> dict[str, int]:
        stats = super().finish()
        if self.estimate is not None and self.peak_cache_bytes:
            log.info("FastAttn caches held at most %s (estimated %s)", format_bytes(self.peak_cache_bytes),
                     format_bytes(self.estimate.peak_bytes))
        return stats

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


def _grid_text(grid: tuple[int, ...] | None) -> str:
    return "x".join(map(str, grid)) + " tokens" if grid else "?"


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


def compute_dtype(model: Any) -> torch.dtype:
    """The dtype a ModelPatcher's attention runs in (the manual-cast dtype of fp8 weights)."""
    base = model.model
    if hasattr(base, "get_dtype_inference"):
        return base.get_dtype_inference()
    return getattr(base, "manual_cast_dtype", None) or base.get_dtype()


def apply_fastattn(
    model: Any, plan: Plan, kernel: str = "auto", step_mode: str = STRICT,
    cache_placement: CachePlacement = CachePlacement.DEVICE,
) -> Any:
    """A clone of ``model`` (a ModelPatcher) that samples with ``plan``."""
    return install(model, apply_config(model, plan, kernel, step_mode, cache_placement))


def apply_config(
    model: Any, plan: Plan, kernel: str = "auto", step_mode: str = STRICT,
    cache_placement: CachePlacement = CachePlacement.DEVICE,
) -> ApplyConfig:
    """What ``apply_fastattn`` installs, after every check that needs no latent."""
    check_step_mode(step_mode)
    geometry = check_plan(model, plan)
    return ApplyConfig(plan=plan, geometry=geometry, kernel=usable_kernel(kernel, model.load_device),
                       step_mode=step_mode, cache_placement=cache_placement, dtype=compute_dtype(model))
