"""One sampling run and its model calls, as the sampler hook sees them.

``Run`` is what an apply run (``apply.ApplyRun``) and a calibration run
(``calibration.CalibrationRun``) have in common, and the small protocol the hook drives:
``calc_cond_batch`` (one batch of conds is evaluated), ``begin_call`` (a model call starts:
its step, call site, CFG rows, token grid), ``strategy`` (a layer's
strategy at a step), ``attention`` (compute one compressible layer) and ``finish`` (free
everything). A run is created by the OUTER_SAMPLE wrapper and finished in its ``finally``.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import Counter
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..context import CallContext
from ..engine import attend
from ..state import RunState
from ..steps import StepMapper
from ..strategies import COND, Strategy
from ..window import TokenLayout, WindowSpec
from .call_sites import CallSite, SiteTracker, explain_misses
from .families import OVERRIDE, Geometry, UnplaceableCall

if TYPE_CHECKING:
    from .raylight import ParallelGroups

log = logging.getLogger("ditfastattn")


class Run:
    """Everything one sampling run owns; ``finish()`` frees it."""

    def __init__(self, geometry: Geometry, window: WindowSpec, kernel: str, steps: StepMapper, state: RunState,
                 plan_grid: tuple[int, ...] | None = None, module_outputs: bool = False) -> None:
        self.geometry, self.window, self.kernel = geometry, window, kernel
        self.module_outputs = module_outputs and geometry.attach != OVERRIDE
        """AST reuses the whole attention module's output (where the pack owns the module)."""
        self.steps = steps
        self.state = state
        """The caches of the sampling device (the only ones, unless MultiGPU CFG Split runs)."""
        self.device_states: dict[Any, RunState] = {}
        """MultiGPU CFG Split: each extra device's worker thread keeps its own caches, so
        nothing is shared, copied or waited for across devices."""
        self.plan_grid = plan_grid
        self.peak_cache_bytes: int | None = None
        """The most cache memory the run held at once (all devices), known once it finished."""
        self.lock = threading.Lock()
        self.reported: set[str] = set()
        self.sites = SiteTracker()
        """Which of a step's model calls each call is (context windows, guidance calls)."""
        self.notes: list[str] = []
        """Why strategies ran FULL, explained once at the end of the run (log and node summary)."""
        self.parallel: ParallelGroups | None = None
        """raylight's parallel groups where this run is on one of its workers (set by
        ``raylight.open_route`` as the run starts)."""
        self.full_reason: str | None = None
        """Why every layer of this run is FULL (said once at its start), or None."""
        self.preferred_attention: Any = None
        """The attention backend the checkpoint's modules choose for themselves (ComfyUI 0.35+),
        which the layers FastAttn leaves alone run with (``attention_chain.preferred_backend``)."""

    @functools.cached_property
    def hooks_attention(self) -> bool:
        """Whether an attention call of this run may compute other than as the model makes it.
        A plan without a compressed cell leaves attention alone: the override is not set and
        module patches run the module's own forward (under torch.compile: no graph break where
        the family attaches by the override)."""
        schedule = self.state.schedule
        return schedule is None or any(s is not Strategy.FULL for s in schedule.counts())

    # --- the protocol ---------------------------------------------------------------------
    def strategy(self, step: int, layer: int) -> Strategy:
        raise NotImplementedError

    def attention(self, call: ModelCall, layer: int, ctx: CallContext, q: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor, dense: Callable, passthrough: Callable[[], torch.Tensor],
                  **layout: bool | int) -> torch.Tensor:
        """One compressible layer of ``call`` (placed by the hook): compute it under its
        strategy; a FULL layer whose output nothing keeps runs as the model makes it."""
        strategy = self.strategy(call.step, layer)
        state = call.state
        if strategy is Strategy.FULL and not state.keeps_anything(call.step, layer):
            return passthrough()
        return attend(q, k, v, strategy, layer, ctx, state, dense=dense, **layout)

    def calc_cond_batch(self, executor: Callable, model: Any, conds: list, x_in: torch.Tensor,
                        timestep: torch.Tensor, model_options: dict) -> list:
        """One calc_cond_batch of the sampler (per context window, per guidance call)."""
        return executor(model, conds, x_in, timestep, model_options)

    def begin_call(self, x: torch.Tensor, sigma: torch.Tensor, c_crossattn: Any, options: dict,
                   conds: Mapping[str, Any] | None = None) -> ModelCall:
        """A model call starts. ``conds``: its other conditioning kwargs (where LTX-2 passes
        the shapes of the latents it packs into x, and LTX its keyframe guides)."""
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
        if grid is not None:
            self.explain_grid_mismatch(grid)
        state = self.state_for(options)
        site, cond_lists = self.sites.site(options)
        if step is not None:
            state.begin_step(step)
        cond_or_uncond = tuple(options.get("cond_or_uncond") or (COND,))
        uuids = options.get("uuids")
        conds = tuple(uuids) if isinstance(uuids, (list, tuple)) and len(uuids) == len(cond_or_uncond) else None
        return ModelCall(run=self, state=state, step=step, cond_or_uncond=cond_or_uncond, grid=grid,
                         text_len=text_len, site=site, conds=conds, cfg_pair=cond_lists in (None, 2), rows=x.shape[0])

    def finish(self) -> dict[str, int]:
        """Free every cache; returns the run's counters (all devices)."""
        stats = dict(self.state.stats)
        site_misses = Counter(self.state.site_misses)
        self.state.note_peak()
        self.peak_cache_bytes = self.state.peak_bytes
        for state in self.device_states.values():
            for k, v in state.stats.items():
                stats[k] = stats.get(k, 0) + v
            site_misses.update(state.site_misses)
            state.note_peak()
            self.peak_cache_bytes += state.peak_bytes
            state.reset()
        self.device_states.clear()
        if stats:
            log.info("FastAttn run: %s", ", ".join(f"{k} {v}" for k, v in sorted(stats.items())))
        self.notes = explain_misses(stats, site_misses)
        for line in self.notes:
            log.warning("FastAttn: %s", line)
        self.state.reset()
        return stats

    # --- shared bookkeeping ---------------------------------------------------------------
    def run_full(self, reason: str) -> None:
        """Run every layer FULL (the attention hooks place nothing), and say why once."""
        self.full_reason = reason
        self.state.count("parallel_full")
        self.report("full", reason)

    def report(self, key: str, message: str) -> None:
        """Log ``message`` once per run."""
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
                state = self.device_states[device] = RunState(self.state.schedule, self.state.placement)
                fresh = len(self.device_states) == 2
            else:
                fresh = False
        if fresh:
            self.report("multigpu", "MultiGPU CFG Split: each device keeps its own FastAttn caches; CFG sharing "
                        "(ASC) between branches on different devices runs FULL, and a reuse whose step ran on "
                        "another device is a miss (FULL)")
        return state

    def explain_grid_mismatch(self, grid: tuple[int, ...]) -> None:
        if self.plan_grid is not None and tuple(self.plan_grid) != tuple(grid):
            self.report("grid_mismatch", (
                f"the plan was calibrated at a {self.plan_grid} token grid, this run has {grid}: the "
                "window scales with the image, but errors were measured at the plan's size"))


@dataclass
class ModelCall:
    """One model call: its step, CFG rows and token grid, read by every attention call in it."""

    run: Run
    state: RunState
    step: int | None
    cond_or_uncond: tuple[int, ...]
    grid: tuple[int, ...] | None
    text_len: int | None
    site: CallSite = CallSite()
    """Which of the step's model calls this is: its caches are its own."""
    conds: tuple[Hashable, ...] | None = None
    """ComfyUI's cond uuid per chunk, when given: each cond keeps its own caches."""
    cfg_pair: bool = True
    """The chunks come from a calc_cond_batch of [positive, negative] (CFG sharing applies)."""
    rows: int | None = None
    """The batch rows of the model call: an attention call over other rows was split off."""
    layers_seen: int = 0
    layers_done: set[int] = field(default_factory=set)
    contexts: dict[tuple, CallContext | None] = field(default_factory=dict)

    def restart(self) -> None:
        """The model call runs again from its first layer (nothing reached the engine yet)."""
        self.layers_seen = 0
        self.layers_done.clear()

    def cfg_part(self, rows: int) -> slice | None:
        """The chunks of ``cond_or_uncond`` an attention call over ``rows`` of this call's rows
        holds, where raylight's CFG parallel split the batch (rank r of w keeps the r-th w-th of
        the rows, transformer_options untouched); None where the rows cannot be told."""
        groups = self.run.parallel
        n = len(self.cond_or_uncond)
        if groups is None or groups.cfg_world < 2 or self.rows != rows * groups.cfg_world or n % groups.cfg_world:
            return None
        per = n // groups.cfg_world
        return slice(groups.cfg_rank * per, (groups.cfg_rank + 1) * per)

    def context(self, seq_len: int, part: slice | None = None) -> CallContext | None:
        """The engine's context for this call's self-attention over ``seq_len`` tokens (built
        once per token count) of the chunks ``part`` (all by default); None where those tokens
        are not the image's (a text refiner)."""
        key = (seq_len, None if part is None else (part.start, part.stop))
        if key not in self.contexts:
            tokens = self.run.geometry.token_layout(seq_len, self.grid, self.text_len)
            branches, conds, elsewhere = self.cond_or_uncond, self.conds, False
            if part is not None:  # the other CFG chunks are on other GPUs
                branches, elsewhere = branches[part], True
                conds = None if conds is None else conds[part]
            self.contexts[key] = None if tokens is None else CallContext(
                step=self.step, cond_or_uncond=branches, tokens=tokens,
                window=self.run.window, kernel=self.run.kernel, module_outputs=self.run.module_outputs,
                site=self.site, conds=conds, cfg_pair=self.cfg_pair and not elsewhere, cfg_elsewhere=elsewhere,
            )
        return self.contexts[key]


def check_window(geometry: Geometry, window: WindowSpec, latent_shape: tuple[int, ...], fix: str) -> None:
    """Refuse, before sampling, a window that cannot be laid on this latent's token grid."""
    try:
        grid = geometry.grid(geometry.latent_shape(tuple(latent_shape), {}))
    except ValueError:
        return  # a latent the family cannot place runs FULL, and says so at the first call
    try:
        window.bind(TokenLayout.image_only(grid))
    except ValueError as e:
        shape = "neighbourhood" if window.border == "shift" else "box"
        kind = "1D band" if window.dims == 1 else f"{window.dims}D {shape}"
        hint = " (a video latent needs a 1D band or a 3D box)" if len(grid) == 3 and grid[0] > 1 else ""
        raise ValueError(f"the {kind} window cannot be used on this latent ({e}){hint}: {fix}") from e

