"""Per-run and per-call state of the ComfyUI hook.

- ``FastAttnConfig`` / ``CalibrationConfig``: immutable, kept in model_options (clone() copies them).
- ``FastAttnRun``: one sampling run's state, created by the OUTER_SAMPLE wrapper, freed in ``finally``.
- ``ModelCall``: one model call's step, CFG rows and token grid, built by the APPLY_MODEL wrapper
  and read by every attention call of that model call; it routes image self-attention to the
  engine (or, while calibrating in fast mode, to the calibrator).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..calibrate import FAST, FastCalibrator, PaperCalibrator
from ..context import CallContext
from ..engine import attend
from ..plan import Plan
from ..state import RunState
from ..steps import STRICT, StepMapper
from ..strategies import COND, UNCOND, Strategy
from ..window import TokenLayout, WindowSpec
from .families import Geometry, UnplaceableCall

log = logging.getLogger("ditfastattn")

KEY = "ditfastattn"
CONFIG_KEY = "ditfastattn_config"
RUN_KEY = "ditfastattn_run"
CALL_KEY = "ditfastattn_call"
OVERRIDE_KEY = "optimized_attention_override"



class PlanMismatchError(ValueError):
    """The plan was made for another model or other sampling settings."""


@dataclass(frozen=True)
class FastAttnConfig:
    """Apply a plan."""

    plan: Plan
    geometry: Geometry
    kernel: str = "auto"
    step_mode: str = STRICT

    @property
    def layers(self) -> int:
        return self.plan.layers

    @property
    def window(self) -> WindowSpec:
        return self.plan.window


class CalibrationSink:
    """Where a calibration run leaves its result for the node that started it. Shared, not
    copied, when ComfyUI deep-copies model options."""

    def __init__(self) -> None:
        self.calibrator: PaperCalibrator | FastCalibrator | None = None
        self.sample_sigmas: list[float] | None = None
        self.grid: tuple[int, ...] | None = None
        self.stats: dict[str, int] = {}

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
    on_progress: Callable[[], None] | None = None

    @property
    def layers(self) -> int:
        return self.geometry.layers


class CallSlot(threading.local):
    """Where attention modules that never see transformer_options (PixArt) find the current
    model call. Shared by identity between the APPLY_MODEL wrapper and the module patches;
    one value per thread (MultiGPU CFG Split runs model calls in parallel threads)."""

    def __init__(self) -> None:
        self.current: ModelCall | None = None


@dataclass
class FastAttnRun:
    """Everything one sampling run owns; ``finish()`` frees it."""

    config: FastAttnConfig | CalibrationConfig
    steps: StepMapper
    state: RunState
    """The caches of the sampling device (the only ones, unless MultiGPU CFG Split runs)."""
    device_states: dict[Any, RunState] = field(default_factory=dict)
    """MultiGPU CFG Split: each extra device's worker thread keeps its own caches, so nothing is
    shared, copied or waited for across devices."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    reported: set[str] = field(default_factory=set)
    row_override: list[Strategy] | None = None
    """Paper calibration: the row the current (trial or writing) forward runs."""
    paper: PaperCalibrator | None = None
    fast: FastCalibrator | None = None
    current_step: int | None = None

    @classmethod
    def start(
        cls, config: FastAttnConfig | CalibrationConfig, sample_sigmas: torch.Tensor, latent_shape: tuple[int, ...]
    ) -> FastAttnRun:
        """The run's state, after checking what can be known before the first model call:
        the run's schedule against the plan's, the window against the latent."""
        sigmas = [float(s) for s in sample_sigmas.tolist()]
        check_window(config, latent_shape)
        if isinstance(config, FastAttnConfig):
            steps = StepMapper.for_run(config.plan.sigmas, sigmas, config.step_mode)
            run = cls(config=config, steps=steps, state=RunState(config.plan.schedule))
            if not steps.by_sigma:
                run.explain_schedule_mismatch(sigmas)
            return run
        config.sink.sample_sigmas = sigmas
        return cls(config=config, steps=StepMapper.for_run(sigmas, sigmas), state=RunState())

    @property
    def geometry(self) -> Geometry:
        return self.config.geometry

    @property
    def calibrating(self) -> bool:
        return isinstance(self.config, CalibrationConfig)

    def report(self, key: str, message: str) -> None:
        with self.lock:
            if key in self.reported:
                return
            self.reported.add(key)
        log.warning("FastAttn: %s", message)

    def state_for(self, options: Mapping[str, Any]) -> RunState:
        """The caches of the device this model call runs on. ComfyUI's MultiGPU CFG Split runs
        cond and uncond chunks at once, in one thread per device, marked in transformer_options."""
        device = options.get("multigpu_thread_device")
        if device is None:
            return self.state
        with self.lock:
            state = self.device_states.get(device)
            if state is None:
                state = self.device_states[device] = RunState(self.state.schedule)
                fresh = len(self.device_states) == 2
            else:
                fresh = False
        if fresh:
            self.report("multigpu", "MultiGPU CFG Split: each device keeps its own FastAttn caches; CFG sharing "
                        "(ASC) between branches on different devices runs FULL, and a reuse whose step ran on "
                        "another device is a miss (FULL)")
        return state

    def explain_schedule_mismatch(self, sigmas: list[float]) -> None:
        plan = self.config.plan
        if len(sigmas) != len(plan.sigmas):
            return  # normalised step matching: the schedules differ by design
        worst = max(abs(a - b) / max(abs(b), 1e-6) for a, b in zip(sigmas[:-1], plan.sigmas[:-1], strict=True))
        if worst > 0.05:
            self.report("sigmas", (
                f"this run's noise schedule differs from the plan's by up to {worst:.0%} (plan: "
                f"{plan.sampler or '?'} / {plan.scheduler or '?'}, denoise {plan.denoise:g}); the plan "
                "applies by step, but recalibrate for these settings for the quality it was made for"))

    def explain_grid_mismatch(self, grid: tuple[int, ...]) -> None:
        plan = getattr(self.config, "plan", None)
        if plan is not None and plan.grid is not None and tuple(plan.grid) != tuple(grid):
            self.report("grid_mismatch", (
                f"the plan was calibrated at a {plan.grid} token grid, this run has {grid}: the "
                "window scales with the image, but errors were measured at the plan's size"))

    def strategy(self, step: int, layer: int) -> Strategy:
        if self.row_override is not None:
            return self.row_override[layer]
        if isinstance(self.config, FastAttnConfig):
            return self.config.plan.schedule[step][layer]
        return Strategy.FULL

    def calibrator(self, has_cfg: bool) -> PaperCalibrator | FastCalibrator:
        """The run's calibrator, created at the first call, when CFG is known."""
        config = self.config
        assert isinstance(config, CalibrationConfig)
        if config.sink.calibrator is None:
            if config.mode == FAST:
                config.sink.calibrator = FastCalibrator(config.layers, config.delta, has_cfg, config.candidates)
            else:
                config.sink.calibrator = PaperCalibrator(
                    config.layers, config.delta, has_cfg, config.candidates,
                    on_trial=config.on_progress, miss_count=lambda: self.state.misses,
                )
        cal = config.sink.calibrator
        self.paper = cal if isinstance(cal, PaperCalibrator) else None
        self.fast = cal if isinstance(cal, FastCalibrator) else None
        return cal

    def begin_call(
        self, x: torch.Tensor, sigma: torch.Tensor, c_crossattn: Any, options: dict,
        conds: Mapping[str, Any] | None = None,
    ) -> ModelCall:
        """``conds``: the model call's other conditioning kwargs (where LTX-2 passes the shapes
        of the latents it packs into x, and LTX its keyframe guides)."""
        step = self.steps.plan_step(float(sigma.reshape(-1)[0]))
        if step is None:
            self.report("unmapped", "a model call at a sigma off the schedule ran FULL "
                        "(expected for samplers that evaluate between steps)")
        text_len = c_crossattn.shape[1] if isinstance(c_crossattn, torch.Tensor) and c_crossattn.dim() == 3 else None
        try:
            grid = self.geometry.call_grid(tuple(x.shape), text_len, conds or {})
        except UnplaceableCall as e:
            self.report(e.key, str(e))
            grid, step = None, None
        except ValueError as e:
            self.report("grid", f"{e}; those calls run FULL")
            grid, step = None, None
        cond_or_uncond = tuple(options.get("cond_or_uncond") or (COND,))
        if grid is not None:
            self.explain_grid_mismatch(grid)
        if self.calibrating:
            sink = self.config.sink
            if sink.grid is None and grid is not None:
                sink.grid = grid
            if self.fast is None and self.paper is None:
                self.calibrator(has_cfg=UNCOND in cond_or_uncond)
            if self.fast is not None and step is not None and step != self.current_step:
                if self.current_step is not None:
                    self.fast.end_step(self.current_step)
                self.fast.begin_step(step)
                self.current_step = step
        state = self.state_for(options)
        if step is not None:
            state.begin_step(step)
        return ModelCall(run=self, state=state, step=step, cond_or_uncond=cond_or_uncond, grid=grid,
                         text_len=text_len)

    def finish(self) -> None:
        stats = dict(self.state.stats)
        for state in self.device_states.values():
            for k, v in state.stats.items():
                stats[k] = stats.get(k, 0) + v
            state.reset()
        self.device_states.clear()
        if stats:
            log.info("FastAttn run: %s", ", ".join(f"{k} {v}" for k, v in sorted(stats.items())))
        if self.calibrating:
            if self.fast is not None and self.current_step is not None:
                self.fast.end_step(self.current_step)
            self.config.sink.stats = stats
        self.state.reset()
        self.row_override = None


@dataclass
class ModelCall:
    run: FastAttnRun
    state: RunState
    step: int | None
    cond_or_uncond: tuple[int, ...]
    grid: tuple[int, ...] | None
    text_len: int | None
    layers_seen: int = 0
    layers_done: set[int] = field(default_factory=set)

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        heads: int,
        skip_reshape: bool,
        skip_output_reshape: bool,
        block: Mapping[str, Any],
        unsupported: str | None,
        dense: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
        passthrough: Callable[[], torch.Tensor],
    ) -> torch.Tensor:
        """One attention call of this model call: compress it if it is image self-attention.

        ``block`` carries the call's ``block_type`` / ``block_index`` where the model sets them
        (its transformer_options, or the patched module's own index)."""
        seq_q = q.shape[2] if skip_reshape else q.shape[1]
        seq_k = k.shape[2] if skip_reshape else k.shape[1]
        if seq_q != seq_k or self.grid is None:
            return passthrough()  # cross-attention, or a call we cannot place
        geometry = self.run.geometry
        tokens = geometry.token_layout(seq_q, self.grid, self.text_len)
        if tokens is None:
            return passthrough()  # text refiner
        layer = geometry.layer_of(block, self.layers_seen)
        self.layers_seen += 1
        run, state = self.run, self.state
        if layer is None:
            run.report("block_type", f"{geometry.label} attention calls of block type "
                       f"{block.get('block_type')!r} are not among its compressible layers and ran FULL")
            return passthrough()
        if layer in self.layers_done:
            # the same block again in this model call: extra self-attention inside a block
            # (Wan VACE's control streams); only the block's own first call is its layer
            run.report("repeat", f"{geometry.label} ran extra self-attention inside block {layer} "
                       "(e.g. VACE control streams); those calls ran FULL")
            return passthrough()
        self.layers_done.add(layer)
        if layer >= run.config.layers:
            run.report("layers", f"the model ran more self-attention layers than the plan's "
                       f"{run.config.layers}; the extra ones ran FULL")
            return passthrough()
        if unsupported is not None:
            state.count("passthrough")
            run.report(f"unsupported {unsupported}", f"attention calls with {unsupported} run as the model "
                       "makes them (FULL): the window kernels cannot honour it")
            return passthrough()
        if self.step is None:
            return passthrough()
        strategy = run.strategy(self.step, layer)
        deciding = run.fast is not None and run.row_override is None
        if strategy is Strategy.FULL and not deciding and not _keeps_anything(state, self.step, layer):
            return passthrough()
        if not skip_reshape and v.dim() == 4:  # SD3 passes v as (B, L, H, D)
            v = v.reshape(v.shape[0], v.shape[1], -1)
        ctx = CallContext(
            step=self.step,
            cond_or_uncond=self.cond_or_uncond,
            tokens=tokens,
            window=run.config.window,
            kernel=run.config.kernel,
        )
        layout = dict(heads=heads, skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape)
        if deciding:
            return run.fast.attention(q, k, v, layer, ctx, state, dense, **layout)
        return attend(q, k, v, strategy, layer, ctx, state, dense=dense, **layout)


def check_window(config: FastAttnConfig | CalibrationConfig, latent_shape: tuple[int, ...]) -> None:
    """Refuse, before sampling, a window that cannot be laid on this latent's token grid."""
    if isinstance(config, FastAttnConfig):
        if not any(s.uses_window for s in config.plan.schedule.counts()):
            return
        fix = "use a plan calibrated with a window for this kind of latent"
    else:
        if not any(s.uses_window for s in config.candidates):
            return
        fix = "choose another window in Calibrate FastAttn Plan"
    try:
        grid = config.geometry.grid(config.geometry.latent_shape(tuple(latent_shape), {}))
    except ValueError:
        return  # a latent the family cannot place runs FULL, and says so at the first call
    try:
        config.window.bind(TokenLayout.image_only(grid))
    except ValueError as e:
        kind = {1: "1D band", 2: "2D box", 3: "3D box"}[config.window.dims]
        hint = " (a video latent needs a 1D band or a 3D box)" if len(grid) == 3 and grid[0] > 1 else ""
        raise ValueError(f"the {kind} window cannot be used on this latent ({e}){hint}: {fix}") from e


def _keeps_anything(state: RunState, step: int, layer: int) -> bool:
    return (
        state.keeps_residual(step, layer, COND)
        or state.keeps_residual(step, layer, UNCOND)
        or state.keeps_output(step, layer)
    )
