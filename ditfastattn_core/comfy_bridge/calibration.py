"""Calibrate a plan inside ComfyUI: one sampling run with the user's own model and settings."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..calibrate import FAST, MODES, schedule_from_rows
from ..plan import Calibration, Plan
from ..strategies import Strategy
from ..window import WindowSpec
from .install import calibration_patch, model_geometry
from .run import CalibrationSink


@dataclass(frozen=True)
class CalibrationRequest:
    """A KSampler's inputs plus what calibration needs."""

    seed: int
    steps: int
    cfg: float
    sampler_name: str
    scheduler: str
    denoise: float = 1.0
    delta: float = 0.1
    mode: str = FAST
    candidates: tuple[Strategy, ...] = (Strategy.AST, Strategy.WA_RS_ASC, Strategy.WA_RS, Strategy.ASC)
    window: WindowSpec = WindowSpec()
    samples: int = 1
    kernel: str = "auto"
    start_step: int = 0
    """KSamplerAdvanced's start_at_step: calibrate this range of the schedule only (two-expert
    graphs calibrate one plan per expert, each on its own range)."""
    end_step: int = 10000
    add_noise: bool = True
    return_with_leftover_noise: bool = False

    def __post_init__(self) -> None:
        if not self.delta > 0:
            raise ValueError(f"delta must be > 0 (the allowed mean relative error), got {self.delta}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not self.candidates:
            raise ValueError("choose at least one candidate strategy")
        if self.cfg == 1.0 and all(c.shares_cfg for c in self.candidates):
            raise ValueError("cfg = 1 has no unconditional branch, so ASC candidates alone cannot "
                             "compress anything: add AST or WA_RS, or raise cfg")
        if not 1 <= self.samples <= 64:
            raise ValueError(f"samples must be in [1, 64], got {self.samples}")
        if self.steps < 1:
            raise ValueError("steps must be at least 1")
        if not 0 <= self.start_step < min(self.steps, self.end_step):
            raise ValueError(f"start_at_step {self.start_step} leaves nothing to sample (steps {self.steps}, "
                             f"end_at_step {self.end_step}): choose a start below both")


@dataclass
class CalibrationResult:
    plan: Plan
    samples: torch.Tensor
    stats: dict[str, int]

    def summary(self) -> str:
        cost = self.plan.cost()
        delta = self.plan.calibration.delta
        return (
            f"{self.plan.calibration.mode} calibration, delta {delta}: {cost.describe()}; "
            f"{self.plan.steps} steps x {self.plan.layers} layers, grid {self.plan.grid}"
        )


def ksampler_inputs(
    model: Any, latent: dict, seed: int, samples: int = 1, add_noise: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The latent and noise KSampler would sample from (``nodes.common_ksampler``), so a
    calibration run samples exactly what the user's KSampler samples: same size (the latent's
    downscale ratios, on trees that have them), same noise. ``samples`` > 1 repeats the latent
    and draws each copy's noise from seed, seed + 1, ...; without ``add_noise`` (as
    KSamplerAdvanced) the latent already holds its noise, e.g. a previous expert's output."""
    import comfy.sample

    latent_image = latent["samples"]
    ratios = ("downscale_ratio_spacial", "downscale_ratio_temporal")
    accepted = inspect.signature(comfy.sample.fix_empty_latent_channels).parameters
    extra = {r: latent.get(r) for r in ratios if r in accepted}
    latent_image = comfy.sample.fix_empty_latent_channels(model, latent_image, **extra)
    if samples > 1:
        if getattr(latent_image, "is_nested", False):
            raise ValueError("samples > 1 with an audio-video latent (LTX-2) is not supported: use samples = 1")
        latent_image = latent_image.repeat(samples, *([1] * (latent_image.dim() - 1)))
    if not add_noise:  # as KSamplerAdvanced: the latent already holds its noise
        return latent_image, torch.zeros(latent_image.size(), dtype=latent_image.dtype, layout=latent_image.layout,
                                         device="cpu")
    if samples == 1:
        return latent_image, comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    noise = torch.cat([
        comfy.sample.prepare_noise(latent_image[i : i + 1], seed + i) for i in range(latent_image.shape[0])
    ])
    return latent_image, noise


def calibrate(
    model: Any,
    positive: list,
    negative: list,
    latent: dict,
    request: CalibrationRequest,
    on_progress: Callable[[], None] | None = None,
    callback: Callable[..., None] | None = None,
) -> CalibrationResult:
    """Sample once with calibration on; returns the plan and the latent it produced."""
    import comfy.sample

    geometry = model_geometry(model)
    extra_devices = getattr(model, "get_additional_models_with_key", lambda key: [])("multigpu")
    if extra_devices:
        raise ValueError("Calibrate FastAttn Plan measures one forward against another on one device: connect "
                         "the model before MultiGPU CFG Split (the plan it makes applies to the split model)")
    sink = CalibrationSink()
    patched = calibration_patch(
        model, mode=request.mode, delta=request.delta, candidates=request.candidates,
        window=request.window, sink=sink, kernel=request.kernel, on_progress=on_progress, geometry=geometry,
    )
    if request.samples > 1 and latent.get("noise_mask") is not None:
        raise ValueError("samples > 1 with an inpainting mask is not supported: use samples = 1")
    latent_image, noise = ksampler_inputs(model, latent, request.seed, request.samples, request.add_noise)
    samples = comfy.sample.sample(
        patched, noise, request.steps, request.cfg, request.sampler_name, request.scheduler,
        positive, negative, latent_image, denoise=request.denoise, disable_noise=not request.add_noise,
        start_step=request.start_step, last_step=request.end_step,
        force_full_denoise=not request.return_with_leftover_noise, noise_mask=latent.get("noise_mask"),
        seed=request.seed, disable_pbar=True, callback=callback,
    )
    if sink.calibrator is None or sink.sample_sigmas is None:
        raise RuntimeError("the sampler never called the model: nothing was calibrated")
    steps = len(sink.sample_sigmas) - 1
    plan = Plan(
        schedule=schedule_from_rows(sink.calibrator.rows, steps, geometry.layers),
        family=geometry.family,
        sigmas=tuple(sink.sample_sigmas),
        sampler=request.sampler_name,
        scheduler=request.scheduler,
        cfg=float(request.cfg),
        denoise=float(request.denoise),
        grid=sink.grid,
        window=request.window,
        calibration=Calibration(mode=request.mode, delta=request.delta, samples=latent_image.shape[0]),
    )
    return CalibrationResult(plan=plan, samples=samples, stats=sink.stats)
