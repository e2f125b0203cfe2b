"""Choosing a plan: the paper's greedy search (Algorithm 1) and a one-forward local search.

Both work step by step on the compressed trajectory, behind one interface (``Calibrator``:
what is decided for a step, decide and run a step, feedback), and know nothing about
ComfyUI: the caller supplies a ``forward(row, write)`` that runs the whole model at the
current step with one strategy per layer (or, with ``row=None``, lets the calibrator choose
inside the forward), reading caches always and writing them only when ``write`` is true.

Paper mode, per step t >= 1: the reference is the all-FULL output (no cache writes); layer by
layer (earlier choices kept), the candidates are tried cheapest first and the first whose
whole-output loss stays under ``(i + 1) / L * delta`` is kept, else FULL; then one writing
forward with the chosen row advances the latent. Step 0 is all FULL.

Fast mode (beyond the paper, after DiTFastAttnV2's idea): during the single writing forward of
a step, each layer computes FULL and every candidate on the same q, k, v, and keeps the
cheapest whose *local* error (relative L1 of the attention output, times a sensitivity scale)
is under the same cumulative budget shape. A local error overstates what reaches the model
output (the residual stream and the output projection damp it), so the scale is learned on the
fly: the caller may also run the step's all-FULL reference (read-only) and report the writing
forward's whole-output loss with ``feedback``; the scale then moves the next step's choices
towards the paper's criterion (whole-output loss = delta). Without feedback the scale stays 1
(conservative). Cost: one or two forwards per step plus the extra attention.

Guided mode (the default; beyond the paper): fast mode's one-forward search, with each layer's
error measured where it matters, on the guided prediction ``uncond + cfg * (cond - uncond)``
the sampler integrates (relative squared error of the layer's attention output combined that
way), against a fixed budget: no reference forward, no learned scale. Cost: one forward per
step plus the extra attention.

Sol-Attn (letter S) is weighed by its cost at the call, which depends on the sequence length
(about 0.3 of dense at 4k tokens, 0.9 at 256): fast and guided mode, which see each call, try it
cheapest first among the others (``trial_order``: before the first candidate that costs more
there); paper mode, which does not, tries it last. Where its blocks cover the whole sequence
(the digits demo model's 68 tokens) it saves nothing: the engine runs it dense and counts a miss,
and a trial with a miss is never chosen, in every mode.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from . import sparse
from .context import CallContext
from .engine import DenseFn, attend
from .loss import relative_l1, relative_squared_error
from .state import RunState
from .strategies import CANDIDATE_ORDER, COND, DEFAULT_CANDIDATES, UNCOND, Compute, Strategy

log = logging.getLogger("ditfastattn")

PAPER = "paper"
FAST = "fast"
GUIDED = "guided"
MODES = (PAPER, FAST, GUIDED)

Row = list[Strategy]
ForwardFn = Callable[[Row | None, bool], torch.Tensor]
"""Run the model at the current step with ``row`` (None: the calibrator chooses each layer
inside the forward, in ``Calibrator.attention``); write caches iff the bool is true.
Returns the whole model output (all CFG branches, all samples)."""


def guided_rows(out: torch.Tensor, ctx: CallContext, scale: float) -> torch.Tensor:
    """The guided combination ``uncond + scale * (cond - uncond)`` of one attention call's
    output, whose batch rows are ``ctx``'s CFG chunks; a call without exactly one conditional
    and one unconditional chunk (or scale 1) is returned as it is."""
    chunks = ctx.chunks(out.shape[0])
    conds = [c for c in chunks if c.branch == COND]
    unconds = [c for c in chunks if c.branch == UNCOND]
    if len(conds) != 1 or len(unconds) != 1 or scale == 1.0:
        return out
    cond, uncond = out[conds[0].rows], out[unconds[0].rows]
    return uncond + scale * (cond - uncond)


def budget(layer: int, layers: int, delta: float) -> float:
    """Algorithm 1's cumulative threshold for layer ``layer``: (i + 1) / L * delta."""
    return (layer + 1) / layers * delta


def runnable(strategy: Strategy) -> bool:
    """Whether ``strategy`` can run on this machine at all; one line for a candidate that cannot
    (Sol-Attn without a comfy-kitchen that has it), which calibration then leaves out."""
    if strategy.compute is Compute.SPARSE and not sparse.available():
        _say_unavailable(strategy)
        return False
    return True


@functools.cache
def _say_unavailable(strategy: Strategy) -> None:
    log.warning("FastAttn: %s is not a calibration candidate here: the installed comfy-kitchen has no "
                "sol_attn (0.2.40 has it)", strategy.label)


def trial_order(candidates: Sequence[Strategy], ctx: CallContext, has_cfg: bool) -> tuple[Strategy, ...]:
    """``candidates`` (in the table's order) cheapest first at this call: a Sol-Attn candidate,
    whose cost depends on the call's length, goes before the first candidate that costs more
    here; the paper's strategies keep their order among themselves."""
    if not any(c.compute is Compute.SPARSE for c in candidates) or ctx.tokens is None:
        return tuple(candidates)
    try:
        window = ctx.bound_window.fraction
    except ValueError:  # a window that cannot be laid on these tokens: its strategies miss anyway
        window = 1.0
    fraction = sparse.cost_fraction(ctx.tokens)

    def cost(s: Strategy) -> float:
        return s.cost(window, has_cfg, fraction)

    order = [c for c in candidates if c.compute is not Compute.SPARSE]
    for s in (c for c in candidates if c.compute is Compute.SPARSE):
        at = next((i for i, c in enumerate(order) if cost(c) > cost(s)), len(order))
        order.insert(at, s)
    return tuple(order)


@dataclass
class Availability:
    """What a candidate needs at a step (the caches it reads, a branch to share with),
    tracked from the writing forwards."""

    layers: int
    has_cfg: bool
    last_written_step: int = -1
    refreshed: set[int] = field(default_factory=set)
    """Layers that have had a step that computes their window residual (FULL)."""

    def valid(self, step: int, layer: int, strategy: Strategy) -> bool:
        if strategy.shares_cfg and not self.has_cfg:
            return False
        if strategy.reads_previous_output and self.last_written_step != step - 1:
            return False
        if strategy.reads_window_residual and layer not in self.refreshed:
            return False
        return True

    def written(self, step: int, row: Sequence[Strategy]) -> None:
        self.last_written_step = step
        self.refreshed.update(i for i, s in enumerate(row) if s.refreshes_residual)


@dataclass
class Calibrator:
    """One calibration run's decisions. The sampler hook calls ``calibrate_step`` at each
    step's first model call, replays ``decided`` rows for later calls of a decided step, and
    routes the layers of a ``row=None`` forward to ``attention``."""

    layers: int
    delta: float
    has_cfg: bool
    candidates: tuple[Strategy, ...] = DEFAULT_CANDIDATES
    rows: dict[int, Row] = field(default_factory=dict)
    losses: dict[int, float] = field(default_factory=dict)
    """Per decided step, the whole-output loss of its written row vs all-FULL."""

    def __post_init__(self) -> None:
        if not self.delta > 0:
            raise ValueError(f"delta must be > 0, got {self.delta}")
        self.available = Availability(self.layers, self.has_cfg)
        self.candidates = tuple(c for c in CANDIDATE_ORDER if c in self.candidates and runnable(c))

    def decided(self, step: int) -> Row | None:
        """The row chosen for ``step`` once the step is decided, else None."""
        return self.rows[step] if step in self.losses else None

    def calibrate_step(self, step: int, forward: ForwardFn) -> None:
        """Decide ``step``'s row and run it once with cache writes (the sampler's output)."""
        raise NotImplementedError

    def feedback(self, step: int, loss: float) -> None:
        """The whole-output loss of ``step``'s written row against its all-FULL reference."""
        self.losses[step] = loss

    def residual_source(self, step: int, layer: int) -> int:
        """The step whose window residual a window strategy of ``layer`` at ``step`` reads, as
        the finished plan will say (steps that never ran are FULL there): its last earlier step
        that refreshes it; -1 if none."""
        for earlier in range(step - 1, -1, -1):
            row = self.rows.get(earlier)
            if row is None or row[layer].refreshes_residual:
                return earlier
        return -1

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, ctx: CallContext,
                  state: RunState, dense: DenseFn, **layout) -> torch.Tensor:
        """A layer of a ``row=None`` forward: choose and compute. Searches that decide between
        forwards never make one, so the default is dense."""
        return attend(q, k, v, Strategy.FULL, layer, ctx, state, dense=dense, **layout)


@dataclass
class PaperCalibrator(Calibrator):
    on_trial: Callable[[], None] | None = None
    """Called after each trial forward (progress, cancellation)."""
    miss_count: Callable[[], int] | None = None
    """Reads the run's cache-miss counter: a trial with misses silently ran dense somewhere,
    so its low loss says nothing about the candidate."""

    def calibrate_step(self, step: int, forward: ForwardFn) -> None:
        full = [Strategy.FULL] * self.layers
        row = list(full)
        loss = 0.0
        if step > 0:
            reference = forward(full, False)
            self._tick()
            for i in range(self.layers):
                for cand in self.candidates:
                    if not self.available.valid(step, i, cand):
                        continue
                    trial = row[:i] + [cand] + full[i + 1 :]
                    before = self.miss_count() if self.miss_count else 0
                    err = relative_l1(reference, forward(trial, False))
                    self._tick()
                    if self.miss_count and self.miss_count() != before:
                        continue
                    if err < budget(i, self.layers, self.delta):
                        row[i], loss = cand, err
                        break
        forward(row, True)
        self.available.written(step, row)
        self.rows[step] = row
        self.feedback(step, loss)

    def _tick(self) -> None:
        if self.on_trial is not None:
            self.on_trial()


@dataclass
class FastCalibrator(Calibrator):
    """Chooses each layer's strategy inside the step's single forward, from local errors."""

    errors: dict[tuple[int, int], float] = field(default_factory=dict)
    scale: float = 1.0
    """Local error -> whole-output error factor; learned from ``feedback``."""

    MIN_SCALE, MAX_SCALE, MAX_MOVE = 1e-3, 1e3, 4.0

    def calibrate_step(self, step: int, forward: ForwardFn) -> None:
        """Step 0 is all FULL (nothing to choose, nothing to learn from); later steps run the
        all-FULL reference (read-only), then the writing forward in which layers choose."""
        self.begin_step(step)
        if step == 0:
            forward(None, True)
            self.end_step(step)
            self.losses[step] = 0.0
            return
        if not self.measures(step):
            forward(None, True)
            self.end_step(step)
            self.losses[step] = math.nan  # not measured
            return
        reference = forward([Strategy.FULL] * self.layers, False)
        out = forward(None, True)
        self.end_step(step)
        self.feedback(step, relative_l1(reference, out))

    def measures(self, step: int) -> bool:
        """Whether ``step`` runs the all-FULL reference to learn the scale from."""
        return True

    def local_error(self, reference: torch.Tensor, out: torch.Tensor, ctx: CallContext) -> float:
        """One layer's error under a candidate (the relative L1 of its attention output)."""
        return relative_l1(reference, out)

    def feedback(self, step: int, loss: float) -> None:
        """Also moves the sensitivity scale towards whole-output loss = delta."""
        super().feedback(step, loss)
        row = self.rows.get(step, [])
        if all(s is Strategy.FULL for s in row) and loss == 0.0:
            self.scale = max(self.MIN_SCALE, self.scale / self.MAX_MOVE)  # nothing passed: loosen
            return
        move = (max(loss, 1e-12) / self.delta) ** 0.5
        move = min(self.MAX_MOVE, max(1 / self.MAX_MOVE, move))
        self.scale = min(self.MAX_SCALE, max(self.MIN_SCALE, self.scale * move))

    def begin_step(self, step: int) -> None:
        self.rows.setdefault(step, [Strategy.FULL] * self.layers)

    def end_step(self, step: int) -> None:
        self.available.written(step, self.rows[step])

    def _chosen(self, step: int, layer: int) -> Strategy | None:
        return self.rows[step][layer] if (step, layer) in self.errors else None

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, ctx: CallContext,
                  state: RunState, dense: DenseFn, **layout) -> torch.Tensor:
        """Choose (once per step and layer) and compute this layer's attention."""
        step = ctx.step
        chosen = self._chosen(step, layer)
        if chosen is None:
            chosen = Strategy.FULL
            if step > 0:
                with state.read_only():
                    reference = attend(q, k, v, Strategy.FULL, layer, ctx, state, dense=dense, **layout)
                    for cand in trial_order(self.candidates, ctx, self.has_cfg):
                        if not self.available.valid(step, layer, cand):
                            continue
                        misses = state.misses
                        out = attend(q, k, v, cand, layer, ctx, state, dense=dense, **layout)
                        if state.misses != misses:
                            continue  # the cache it needs is not there for these rows
                        err = self.local_error(reference, out, ctx)
                        if err * self.scale < budget(layer, self.layers, self.delta):
                            chosen = cand
                            self.errors[(step, layer)] = err
                            break
            self.errors.setdefault((step, layer), 0.0)
            self.rows[step][layer] = chosen
        return attend(q, k, v, chosen, layer, ctx, state, dense=dense, **layout)


@dataclass
class GuidedCalibrator(FastCalibrator):
    """Fast mode's one-forward local search, judged on what the sampler integrates: each
    layer's error is the relative squared error (DiTFastAttnV2's measure) of its attention
    output combined as the guided prediction ``uncond + cfg * (cond - uncond)``, against
    a fixed budget (no reference forward, no learned scale).

    Why: an error in the unconditional branch reaches the guided prediction multiplied by
    ``cfg - 1``, so a loss on the two branches side by side (the paper's) undercounts ASC's
    error by that factor (5x at cfg 6) and spends the budget on it; and the learned scale of
    fast mode, steered step by step towards whole-output loss = delta, swings between steps
    and spends the budget unevenly. On the demo model this about halves the final error of
    paper mode at equal attention FLOPs, at about one generation's cost (README, Demo model).
    When ComfyUI runs the two branches in separate model calls (low memory), a layer decides
    in the first of them on that branch alone, and the other call follows the decision."""

    guidance: float = 1.0
    """The sampler's CFG scale."""

    def measures(self, step: int) -> bool:
        return False

    def local_error(self, reference: torch.Tensor, out: torch.Tensor, ctx: CallContext) -> float:
        g = self.guidance
        return relative_squared_error(guided_rows(reference, ctx, g), guided_rows(out, ctx, g))


CALIBRATORS: dict[str, type[Calibrator]] = {PAPER: PaperCalibrator, FAST: FastCalibrator, GUIDED: GuidedCalibrator}
"""The calibrator of each mode."""


def schedule_from_rows(rows: dict[int, Row], steps: int, layers: int):
    """The calibrated table; steps that were never run (skipped calls) are all FULL."""
    from .schedule import Schedule

    full = (Strategy.FULL,) * layers
    return Schedule(tuple(tuple(rows.get(step, full)) for step in range(steps)))
