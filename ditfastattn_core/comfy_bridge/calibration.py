"""Calibrate a plan inside ComfyUI: one sampling run with the user's own model and settings.

All ComfyUI-side calibration code: the request (a KSampler's inputs plus what calibration
needs), its config and run, the CALC_COND_BATCH wrapper that drives the calibrator on every
CFG branch at once, and ``calibrate`` itself.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..cache_memory import AttentionSize
from ..calibrate import CALIBRATORS, GUIDED, MODES, PAPER, Calibrator, Row, schedule_from_rows
from ..context import CallContext
from ..plan import Calibration, Plan
from ..state import RunState
from ..steps import StepMapper
from ..strategies import OFFERED_CANDIDATES, Strategy
from ..window import PRESETS, WindowSpec
from .attention_chain import has_core_sparse_attention
from .families import Geometry
from .install import install, model_geometry
from .run import ModelCall, Run, check_window

Progress = Callable[[int, int], None]
"""Called with (forwards done, forwards in all) after each forward; may raise to cancel."""


class CalibrationSink:
    """Where a calibration run leaves its result for the node that started it. Shared, not
    copied, when ComfyUI deep-copies model options."""

    def __init__(self) -> None:
        self.calibrator: Calibrator | None = None
        self.sample_sigmas: list[float] | None = None
        self.grid: tuple[int, ...] | None = None
        self.attention: AttentionSize | None = None
        """The compressible attention calls' size (the widest layer's), for the plan."""
        self.stats: dict[str, int] = {}
        self.notes: list[str] = []
        """Why strategies ran FULL during the run (the node's summary shows them)."""

    def __deepcopy__(self, memo: dict) -> CalibrationSink:
        return self


@dataclass(frozen=True)
class CalibrationConfig:
    """Calibrate a plan during one sampling run."""

    geometry: Geometry
    mode: str
    delta: float
    candidates: tuple[Strategy, ...]
    window: WindowSpec
    sink: CalibrationSink
    kernel: str = "auto"
    cfg: float = 1.0
    """The sampler's CFG scale (calibrators that measure the guided prediction use it)."""
    on_trial: Callable[[], None] | None = None
    """Called after each trial forward of the paper's search (progress, cancellation)."""

    def start_run(self, sample_sigmas: torch.Tensor, latent_shape: tuple[int, ...],
                  model_options: Mapping[str, Any] | None = None) -> CalibrationRun:
        if any(s.uses_window for s in self.candidates):
            check_window(self.geometry, self.window, latent_shape, "choose another window in Calibrate FastAttn Plan")
        sigmas = [float(s) for s in sample_sigmas.tolist()]
        self.sink.sample_sigmas = sigmas
        return CalibrationRun(self, StepMapper.for_run(sigmas, sigmas))

    def make_calibrator(self, has_cfg: bool, miss_count: Callable[[], int]) -> Calibrator:
        """The mode's calibrator, given whichever of the run's facts it takes."""
        cls = CALIBRATORS[self.mode]
        offered = dict(on_trial=self.on_trial, miss_count=miss_count, guidance=self.cfg)
        takes = {f.name for f in dataclasses.fields(cls)}
        extra = {k: v for k, v in offered.items() if k in takes}
        return cls(self.geometry.layers, self.delta, has_cfg, self.candidates, **extra)


class CalibrationRun(Run):
    """A sampling run that decides the plan: each step's row is chosen in CALC_COND_BATCH
    (``calibrate_step``) before or while the step's writing forward runs."""

    def __init__(self, config: CalibrationConfig, steps: StepMapper) -> None:
        super().__init__(config.geometry, config.window, config.kernel, steps, RunState())
        self.config = config
        self.calibrator: Calibrator | None = None
        self.row: Row | None = None
        """The row the current forward runs; None in a forward where the calibrator chooses."""

    def calibrator_for(self, has_cfg: bool) -> Calibrator:
        """The run's calibrator, made at the first model call, when CFG is known."""
        if self.calibrator is None:
            self.calibrator = self.config.sink.calibrator = self.config.make_calibrator(
                has_cfg, miss_count=lambda: self.state.misses)
            self.state.residual_sources = self.calibrator.residual_source
        return self.calibrator

    def strategy(self, step: int, layer: int) -> Strategy:
        return self.row[layer] if self.row is not None else Strategy.FULL

    def attention(self, call: ModelCall, layer: int, ctx: CallContext, q: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor, dense: Callable, passthrough: Callable[[], torch.Tensor],
                  **layout: bool | int) -> torch.Tensor:
        self.note_size(ctx, q)
        if self.row is None and self.calibrator is not None:
            return self.calibrator.attention(q, k, v, layer, ctx, call.state, dense, **layout)
        return super().attention(call, layer, ctx, q, k, v, dense, passthrough, **layout)

    def note_size(self, ctx: CallContext, q: torch.Tensor) -> None:
        """Remember the largest attention call seen (the plan's cache estimate sizes by it)."""
        seen = self.config.sink.attention or AttentionSize(0, 0)
        tokens = ctx.tokens.seq_len
        width = q.numel() // (q.shape[0] * tokens)  # either of ComfyUI's layouts
        self.config.sink.attention = AttentionSize(max(seen.tokens, tokens), max(seen.width, width))

    def begin_call(self, x: torch.Tensor, sigma: torch.Tensor, c_crossattn: Any, options: dict,
                   conds: dict | None = None) -> ModelCall:
        call = super().begin_call(x, sigma, c_crossattn, options, conds)
        if self.config.sink.grid is None and call.grid is not None:
            self.config.sink.grid = call.grid
        return call

    def calc_cond_batch(self, executor: Callable, model: Any, conds: list, x_in: torch.Tensor,
                        timestep: torch.Tensor, model_options: dict) -> list:
        """Calibration runs here, on every CFG branch at once, so that losses are the paper's
        whole-model output error whether ComfyUI batches cond and uncond or not: the calibrator
        decides and runs a step at its first calc_cond_batch; later ones of a decided step (other
        context windows, guidance calls) and calls off the schedule replay its row."""
        has_cfg = len(conds) > 1 and any(c is not None for c in conds[1:])
        calibrator = self.calibrator_for(has_cfg)
        step = self.steps.plan_step(float(timestep.reshape(-1)[0]))
        decided = calibrator.decided(step) if step is not None else None
        if step is None or decided is not None:
            self.row = decided if decided is not None else [Strategy.FULL] * calibrator.layers
            try:
                return executor(model, conds, x_in, timestep, model_options)
            finally:
                self.row = None
        written: list = []

        def forward(row: Row | None, write: bool) -> torch.Tensor:
            self.row = row
            try:
                if write:
                    outs = executor(model, conds, x_in, timestep, model_options)
                    written.append(outs)
                else:
                    with self.state.read_only():
                        outs = executor(model, conds, x_in, timestep, model_options)
            finally:
                self.row = None
            return torch.cat([o.reshape(-1) for o in outs if o is not None])

        calibrator.calibrate_step(step, forward)
        return written[-1]

    def finish(self) -> dict[str, int]:
        self.config.sink.stats = stats = super().finish()
        self.config.sink.notes = list(self.notes)
        self.row = None
        return stats


def calibration_patch(
    model: Any,
    *,
    mode: str,
    delta: float,
    candidates: tuple[Strategy, ...],
    window: WindowSpec,
    sink: CalibrationSink,
    kernel: str = "auto",
    cfg: float = 1.0,
    on_trial: Callable[[], None] | None = None,
    geometry: Geometry | None = None,
) -> Any:
    """A clone of ``model`` whose next sampling run calibrates a plan into ``sink``
    (``geometry``: the model's, when the caller has resolved it already)."""
    from ..kernels import usable_kernel

    config = CalibrationConfig(
        geometry=geometry or model_geometry(model), mode=mode, delta=delta, candidates=candidates,
        window=window, sink=sink, kernel=usable_kernel(kernel, model.load_device), cfg=cfg, on_trial=on_trial,
    )
    return install(model, config)


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
    mode: str = GUIDED
    candidates: tuple[Strategy, ...] = OFFERED_CANDIDATES
    window: WindowSpec | None = WindowSpec()
    """The window of WA-RS; None: the model family's default (``Geometry.window``)."""
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

    def forwards_per_step(self, layers: int) -> int:
        """Forwards per calibrated step (progress units): the paper's search makes a reference
        and up to four trials per layer, the others about one."""
        return 4 * layers + 2 if self.mode == PAPER else 1

    @property
    def sampled_steps(self) -> int:
        """The steps this request samples (KSamplerAdvanced's range)."""
        return min(self.steps, self.end_step) - self.start_step


@dataclass
class CalibrationResult:
    plan: Plan
    samples: torch.Tensor
    stats: dict[str, int]
    notes: tuple[str, ...] = ()
    """Why strategies ran FULL in the calibration run (context windows, guidance calls, ...)."""

    def summary(self) -> str:
        cost = self.plan.cost()
        delta = self.plan.calibration.delta
        lines = [
            f"{self.plan.calibration.mode} calibration, delta {delta}: {cost.describe()}; "
            f"{self.plan.steps} steps x {self.plan.layers} layers, grid {self.plan.grid}",
            *self.notes,
        ]
        return "\n".join(lines)


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
    on_progress: Progress | None = None,
) -> CalibrationResult:
    """Sample once with calibration on; returns the plan and the latent it produced.
    ``on_progress`` is told the forwards done after each one, and may raise to cancel."""
    import comfy.sample

    geometry = model_geometry(model)
    per_step = request.forwards_per_step(geometry.layers)
    total = request.sampled_steps * per_step
    done = 0

    def report(forwards: int) -> None:
        nonlocal done
        done = forwards
        if on_progress is not None:
            on_progress(min(done, total), total)

    def on_trial() -> None:
        report(done + 1)

    def on_step(step: int, *args: Any) -> None:
        report((step + 1) * per_step)  # the sampler counts steps from the range's start

    extra_devices = getattr(model, "get_additional_models_with_key", lambda key: [])("multigpu")
    if extra_devices:
        raise ValueError("Calibrate FastAttn Plan measures one forward against another on one device: connect "
                         "the model before MultiGPU CFG Split (the plan it makes applies to the split model)")
    if has_core_sparse_attention(model):
        raise ValueError("Calibrate FastAttn Plan measures its strategies against full attention, but core Model "
                         "Sparse Attention on this model would compute some layers itself: connect the model before "
                         "Model Sparse Attention, and add that node after Apply FastAttn instead")
    sink = CalibrationSink()
    window, notes = request.window, []
    if window is None:
        window = PRESETS[geometry.window]
        notes.append(f"window: {geometry.window}, the default for {geometry.label} (docs/window_study.md)")
    patched = calibration_patch(
        model, mode=request.mode, delta=request.delta, candidates=request.candidates,
        window=window, sink=sink, kernel=request.kernel, cfg=request.cfg, on_trial=on_trial,
        geometry=geometry,
    )
    if request.samples > 1 and latent.get("noise_mask") is not None:
        raise ValueError("samples > 1 with an inpainting mask is not supported: use samples = 1")
    latent_image, noise = ksampler_inputs(model, latent, request.seed, request.samples, request.add_noise)
    samples = comfy.sample.sample(
        patched, noise, request.steps, request.cfg, request.sampler_name, request.scheduler,
        positive, negative, latent_image, denoise=request.denoise, disable_noise=not request.add_noise,
        start_step=request.start_step, last_step=request.end_step,
        force_full_denoise=not request.return_with_leftover_noise, noise_mask=latent.get("noise_mask"),
        seed=request.seed, disable_pbar=True, callback=on_step,
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
        attention=sink.attention,
        window=window,
        calibration=Calibration(mode=request.mode, delta=request.delta, samples=latent_image.shape[0]),
    )
    return CalibrationResult(plan=plan, samples=samples, stats=sink.stats, notes=(*notes, *sink.notes))
