"""The ComfyUI hook: installs a plan on a ModelPatcher clone and runs it during sampling.

Roles, one per piece:
- ``FastAttnConfig``   the immutable plan + options, kept in model_options (clone() copies it).
- ``FastAttnRun``      per-run state, created by the OUTER_SAMPLE wrapper and reset in ``finally``.
- ``ModelCall``        per model call: step, CFG rows, token grid; built by the APPLY_MODEL
                       wrapper and read by every attention call of that model call.
- the attention override (families whose attention sees transformer_options) or attention
  module object patches (PixArt), which route self-attention to ``ModelCall.attention``.

Only keyed wrappers are used, an attention override installed before ours is chained for all
dense work, and nothing is left on the shared model: bypassing Apply FastAttn means off.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..calibrate import FAST, FastCalibrator, PaperCalibrator
from ..context import CallContext
from ..engine import attend
from ..loss import relative_l1
from ..plan import Plan
from ..state import RunState
from ..steps import STRICT, StepMapper
from ..strategies import COND, UNCOND, Strategy
from ..window import WindowSpec
from .families import FAMILIES, Family, UnsupportedModelError, detect_family, layer_count

log = logging.getLogger("ditfastattn")

KEY = "ditfastattn"
CONFIG_KEY = "ditfastattn_config"
RUN_KEY = "ditfastattn_run"
CALL_KEY = "ditfastattn_call"
OVERRIDE_KEY = "optimized_attention_override"
_UNSUPPORTED_CLASSES = {"WAN22_S2V": "Wan 2.2 S2V blocks do not pass transformer_options to attention"}


class PlanMismatchError(ValueError):
    """The plan was made for another model or other sampling settings."""


@dataclass(frozen=True)
class FastAttnConfig:
    """Apply a plan."""

    plan: Plan
    family: str
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

    family: str
    layers: int
    mode: str
    delta: float
    candidates: tuple[Strategy, ...]
    window: WindowSpec
    sink: CalibrationSink
    kernel: str = "auto"
    on_progress: Callable[[], None] | None = None


class CallSlot:
    """Where attention modules that never see transformer_options (PixArt) find the current
    model call. Shared by identity between the APPLY_MODEL wrapper and the module patches."""

    def __init__(self) -> None:
        self.current: ModelCall | None = None


@dataclass
class FastAttnRun:
    """Everything one sampling run owns; ``finish()`` frees it."""

    config: FastAttnConfig | CalibrationConfig
    steps: StepMapper
    state: RunState
    reported: set[str] = field(default_factory=set)
    row_override: list[Strategy] | None = None
    """Paper calibration: the row the current (trial or writing) forward runs."""
    paper: PaperCalibrator | None = None
    fast: FastCalibrator | None = None
    current_step: int | None = None

    @classmethod
    def start(cls, config: FastAttnConfig | CalibrationConfig, sample_sigmas: torch.Tensor) -> FastAttnRun:
        sigmas = [float(s) for s in sample_sigmas.tolist()]
        if isinstance(config, FastAttnConfig):
            steps = StepMapper.for_run(sigmas, config.plan.steps, config.step_mode)
            return cls(config=config, steps=steps, state=RunState(config.plan.schedule))
        config.sink.sample_sigmas = sigmas
        steps = StepMapper.for_run(sigmas, len(sigmas) - 1)
        return cls(config=config, steps=steps, state=RunState())

    @property
    def family(self) -> Family:
        return FAMILIES[self.config.family]

    @property
    def calibrating(self) -> bool:
        return isinstance(self.config, CalibrationConfig)

    def report(self, key: str, message: str) -> None:
        if key not in self.reported:
            self.reported.add(key)
            log.warning("FastAttn: %s", message)

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

    def begin_call(self, x: torch.Tensor, sigma: torch.Tensor, c_crossattn: Any, options: dict) -> ModelCall:
        step = self.steps.plan_step(float(sigma.reshape(-1)[0]))
        if step is None:
            self.report("unmapped", "a model call at a sigma off the schedule ran FULL "
                        "(expected for samplers that evaluate between steps)")
        try:
            grid = self.family.grid(tuple(x.shape))
        except ValueError as e:
            self.report("grid", f"{e}; those calls run FULL")
            grid, step = None, None
        text_len = c_crossattn.shape[1] if isinstance(c_crossattn, torch.Tensor) and c_crossattn.dim() == 3 else None
        cond_or_uncond = tuple(options.get("cond_or_uncond") or (COND,))
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
        return ModelCall(run=self, step=step, cond_or_uncond=cond_or_uncond, grid=grid, text_len=text_len)

    def finish(self) -> None:
        stats = dict(self.state.stats)
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
    step: int | None
    cond_or_uncond: tuple[int, ...]
    grid: tuple[int, ...] | None
    text_len: int | None
    layers_seen: int = 0

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        heads: int,
        skip_reshape: bool,
        skip_output_reshape: bool,
        masked: bool,
        dense: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
        passthrough: Callable[[], torch.Tensor],
    ) -> torch.Tensor:
        """One attention call of this model call: compress it if it is image self-attention."""
        seq_q = q.shape[2] if skip_reshape else q.shape[1]
        seq_k = k.shape[2] if skip_reshape else k.shape[1]
        if seq_q != seq_k or self.grid is None:
            return passthrough()  # cross-attention, or a call we cannot place
        tokens = self.run.family.token_layout(seq_q, self.grid, self.text_len)
        if tokens is None:
            return passthrough()  # text refiner
        layer = self.layers_seen
        self.layers_seen += 1
        run, state = self.run, self.run.state
        if layer >= run.config.layers:
            run.report("layers", f"the model ran more self-attention layers than the plan's "
                       f"{run.config.layers}; the extra ones ran FULL")
            return passthrough()
        if masked:
            self.run.report("masked", "attention calls with a text padding mask run FULL")
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


def _keeps_anything(state: RunState, step: int, layer: int) -> bool:
    return (
        state.keeps_residual(step, layer, COND)
        or state.keeps_residual(step, layer, UNCOND)
        or state.keeps_output(step, layer)
    )


# --- the attention override ----------------------------------------------------------------------


def _chain(previous: Callable | None, func: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
    if previous is not None:
        return previous(func, *args, **kwargs)
    return func(*args, **kwargs)


def make_override(previous: Callable | None) -> Callable:
    """An optimized_attention_override that compresses image self-attention and hands
    everything else, and every dense computation, to ``previous`` (or the backend)."""

    def fastattn_override(func, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        call: ModelCall | None = options.get(CALL_KEY)
        if call is None:
            return _chain(previous, func, args, kwargs)
        q, k, v = args[:3]
        rest = dict(kwargs)
        skip_reshape = bool(rest.pop("skip_reshape", False))
        skip_output_reshape = bool(rest.pop("skip_output_reshape", False))
        heads = args[3] if len(args) > 3 else rest.pop("heads", None)
        rest.pop("heads", None)
        mask = args[4] if len(args) > 4 else rest.pop("mask", None)
        rest.pop("mask", None)
        if heads is None:
            heads = q.shape[1] if skip_reshape else 1

        def dense(qh, kh, vh):
            return _chain(previous, func, (qh, kh, vh, heads),
                          {**rest, "skip_reshape": True, "skip_output_reshape": True})

        return call.attention(
            q, k, v, heads=heads, skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape,
            masked=mask is not None, dense=dense, passthrough=lambda: _chain(previous, func, args, kwargs),
        )

    fastattn_override.ditfastattn = True
    fastattn_override.previous = previous
    return fastattn_override


def _is_ours(override: Any) -> bool:
    return getattr(override, "ditfastattn", False)


# --- PixArt: attention module patches ------------------------------------------------------------


def make_pixart_self_attention(module: torch.nn.Module, slot: CallSlot) -> Callable:
    """Forward of PixArt's AttentionKVCompress (the sr_ratio == 1 path, the only one PixArt
    models use) with its attention op routed through the engine. Calls outside a FastAttn
    model call, and masked calls, run the module's own forward."""
    from comfy.ldm.modules.attention import optimized_attention

    original = type(module).forward.__get__(module)
    heads = module.num_heads

    def dense(q, k, v):
        return optimized_attention(q, k, v, heads, skip_reshape=True, skip_output_reshape=True)

    def forward(x, mask=None, HW=None, block_id=None):
        call = slot.current
        if call is None or mask is not None:
            return original(x, mask=mask, HW=HW, block_id=block_id)
        b, n, c = x.shape
        q, k, v = module.qkv(x).reshape(b, n, 3, c).unbind(2)
        q, k = module.q_norm(q), module.k_norm(k)

        def as_module_does():  # the module's own attention op, bit for bit
            qh, kh, vh = (t.reshape(b, n, heads, c // heads).transpose(1, 2) for t in (q, k, v))
            return optimized_attention(qh, kh, vh, heads, mask=None, skip_reshape=True)

        out = call.attention(
            q, k, v, heads=heads, skip_reshape=False, skip_output_reshape=False, masked=False,
            dense=dense, passthrough=as_module_does,
        )
        return module.proj(out.view(b, n, c))

    return forward


# --- wrappers ------------------------------------------------------------------------------------


def make_apply_model_wrapper(slot: CallSlot) -> Callable:
    def fastattn_apply_model(executor, x, t, c_concat=None, c_crossattn=None, control=None,
                             transformer_options=None, **kwargs):
        options = transformer_options if transformer_options is not None else {}
        run: FastAttnRun | None = options.get(RUN_KEY)
        if run is None:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        call = run.begin_call(x, t, c_crossattn, options)
        options[CALL_KEY] = call
        slot.current = call
        try:
            return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)
        finally:
            slot.current = None
            options.pop(CALL_KEY, None)

    return fastattn_apply_model


def fastattn_calc_cond_batch(executor, model, conds, x_in, timestep, model_options):
    """Calibration runs here, on every CFG branch at once, so that losses are the paper's
    whole-model output error whether ComfyUI batches cond and uncond or not.

    Paper mode: the reference, the trials (read-only) and the one writing forward of a step.
    Fast mode: the all-FULL reference (read-only), then the writing forward in which each
    layer chooses from local errors; its whole-output loss feeds the sensitivity scale."""
    run: FastAttnRun | None = model_options.get("transformer_options", {}).get(RUN_KEY)
    if run is None or not run.calibrating:
        return executor(model, conds, x_in, timestep, model_options)
    has_cfg = len(conds) > 1 and any(c is not None for c in conds[1:])
    cal = run.paper or run.fast or run.calibrator(has_cfg)
    step = run.steps.plan_step(float(timestep.reshape(-1)[0]))
    decided = cal.rows if isinstance(cal, PaperCalibrator) else cal.step_losses
    if step is None or step in decided:  # off-schedule, or a second call of a decided step
        run.row_override = cal.rows.get(step) if step is not None else None
        try:
            return executor(model, conds, x_in, timestep, model_options)
        finally:
            run.row_override = None
    written: list = []

    def forward(row: list[Strategy] | None, write: bool) -> torch.Tensor:
        run.row_override = row
        try:
            if write:
                outs = executor(model, conds, x_in, timestep, model_options)
                written.append(outs)
            else:
                with run.state.read_only():
                    outs = executor(model, conds, x_in, timestep, model_options)
        finally:
            run.row_override = None
        return torch.cat([o.reshape(-1) for o in outs if o is not None])

    if isinstance(cal, PaperCalibrator):
        cal.calibrate_step(step, forward)
    elif step == 0:  # all FULL: nothing to choose, nothing to learn from
        forward(None, True)
        cal.step_losses[step] = 0.0
    else:
        reference = forward([Strategy.FULL] * cal.layers, False)
        cal.feedback(step, relative_l1(reference, forward(None, True)))
    return written[-1]


def fastattn_outer_sample(executor, *args, **kwargs):
    """Creates the run's state, makes sure our override is the outermost one, frees all in
    ``finally`` (also when sampling is interrupted)."""
    import comfy.model_patcher

    guider = executor.class_obj
    original_options = guider.model_options
    guider.model_options = comfy.model_patcher.create_model_options_clone(original_options)
    options = guider.model_options.setdefault("transformer_options", {})
    config: FastAttnConfig | None = options.get(CONFIG_KEY)
    run = None
    try:
        if config is not None:
            run = FastAttnRun.start(config, args[3])
            options[RUN_KEY] = run
            current = options.get(OVERRIDE_KEY)
            if not FAMILIES[config.family].patched_modules and not _is_ours(current):
                options[OVERRIDE_KEY] = make_override(current)
        return executor(*args, **kwargs)
    finally:
        if run is not None:
            run.finish()
        options.pop(RUN_KEY, None)
        guider.model_options = original_options


# --- install -------------------------------------------------------------------------------------


def check_plan(model: Any, plan: Plan) -> Family:
    """The model's family, after checking that ``plan`` was made for this model."""
    family, layers = model_family(model)
    if plan.family != family.name:
        raise PlanMismatchError(
            f"the plan is for a {plan.family} model but this is a {family.name} model: "
            "load the plan made for this model, or calibrate one with Calibrate FastAttn Plan"
        )
    if plan.layers != layers:
        raise PlanMismatchError(
            f"the plan has {plan.layers} attention layers but this {family.name} model has "
            f"{layers}: it was calibrated on another model size; recalibrate for this model"
        )
    return family


def apply_fastattn(model: Any, plan: Plan, kernel: str = "auto", step_mode: str = STRICT) -> Any:
    """A clone of ``model`` (a ModelPatcher) that samples with ``plan``."""
    from ..kernels import kernel_names

    if kernel not in kernel_names():
        raise ValueError(f"unknown window kernel {kernel!r}; choose one of {kernel_names()}")
    StepMapper.for_run([float(s) for s in plan.sigmas], plan.steps, step_mode)  # validates mode
    family = check_plan(model, plan)
    config = FastAttnConfig(plan=plan, family=family.name, kernel=kernel, step_mode=step_mode)
    return _install(model, config, family)


def _install(model: Any, config: FastAttnConfig | CalibrationConfig, family: Family) -> Any:
    import comfy.patcher_extension as ext

    m = model.clone()
    options = m.model_options.setdefault("transformer_options", {})
    options[CONFIG_KEY] = config
    slot = CallSlot()
    if family.patched_modules:
        for i in range(config.layers):
            name = f"diffusion_model.blocks.{i}.attn"
            module = m.get_model_object(name)
            if getattr(module, "sr_ratio", 1) > 1:
                raise UnsupportedModelError("PixArt with KV compression (sr_ratio > 1) is not supported")
            m.add_object_patch(f"{name}.forward", make_pixart_self_attention(module, slot))
    else:
        options[OVERRIDE_KEY] = make_override(options.get(OVERRIDE_KEY))
    m.add_wrapper_with_key(ext.WrappersMP.OUTER_SAMPLE, KEY, fastattn_outer_sample)
    m.add_wrapper_with_key(ext.WrappersMP.APPLY_MODEL, KEY, make_apply_model_wrapper(slot))
    if isinstance(config, CalibrationConfig):
        m.add_wrapper_with_key(ext.WrappersMP.CALC_COND_BATCH, KEY, fastattn_calc_cond_batch)
    return m


def model_family(model: Any) -> tuple[Family, int]:
    """The family of a ModelPatcher's model and its number of compressible layers."""
    base = model.model
    name = type(base).__name__
    if name in _UNSUPPORTED_CLASSES:
        raise UnsupportedModelError(f"{name} is not supported: {_UNSUPPORTED_CLASSES[name]}")
    family = detect_family(base)
    return family, layer_count(base, family)


def calibration_patch(
    model: Any,
    *,
    mode: str,
    delta: float,
    candidates: tuple[Strategy, ...],
    window: WindowSpec,
    sink: CalibrationSink,
    kernel: str = "auto",
    on_progress: Callable[[], None] | None = None,
) -> Any:
    """A clone of ``model`` whose next sampling run calibrates a plan into ``sink``."""
    family, layers = model_family(model)
    config = CalibrationConfig(
        family=family.name, layers=layers, mode=mode, delta=delta, candidates=candidates,
        window=window, sink=sink, kernel=kernel, on_progress=on_progress,
    )
    return _install(model, config, family)
