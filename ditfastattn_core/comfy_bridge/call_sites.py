"""Call sites: which of a step's model calls a cache belongs to.

ComfyUI calls the model more than once per step for the same CFG branch in many graphs:
context windows (one call per window of frames), skip-layer guidance and other post-CFG
guidance (a second call with some blocks skipped, or other conds), guiders with extra conds.
Each such call computes other attention than the sampler's main call, so its caches are its
own: the run's caches are keyed by the ``CallSite`` of the call that kept them (plus the cond's
uuid), and a call reads only what the same site kept at the steps its strategy reads.

A site is named by what is stable from step to step for the same call and differs between
calls of one step:

- the context window's frames (``transformer_options["context_window"].index_list``, plus the
  causal anchor frame ComfyUI 0.29+ prepends);
- its guidance rank: the how-manieth ``calc_cond_batch`` of the sampler's model evaluation it
  belongs to (0: the sampler's own; SkipLayerGuidance, PerpNeg, LTXV's no-reference pass and
  other post-CFG calls come after it), counted per window;
- the blocks it replaces or skips beyond what every call of the run does (``patches_replace``).

``SiteTracker`` counts the guidance ranks from the PREDICT_NOISE and CALC_COND_BATCH wrappers.
"""

from __future__ import annotations

import copy
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class CallSite:
    frames: tuple[int, ...] | None = None
    """The context window's latent frames (None: no context window)."""
    guidance: int = 0
    """0: the sampler's own calc_cond_batch of a model evaluation; n: the n-th after it."""
    replaced: tuple[str, ...] = ()
    """Blocks this call replaces or skips that the run's own options do not (skip-layer guidance)."""

    @property
    def windowed(self) -> bool:
        return self.frames is not None

    @property
    def is_guidance(self) -> bool:
        return self.guidance > 0 or bool(self.replaced)


def window_frames(options: Mapping[str, Any]) -> tuple[int, ...] | None:
    """The frames of the context window this call evaluates (ComfyUI's ``IndexListContextWindow``),
    causal anchor first; None outside context windows."""
    window = options.get("context_window")
    if window is None:
        return None
    frames = tuple(int(i) for i in getattr(window, "index_list", ()))
    anchor = getattr(window, "causal_anchor_index", None)
    return ((int(anchor),) if anchor is not None else ()) + frames


def replaced_blocks(options: Mapping[str, Any]) -> frozenset[str]:
    """Names of the blocks a call's ``patches_replace`` replaces (e.g. ``dit/double_block/3``)."""
    replace = options.get("patches_replace") or {}
    if not isinstance(replace, Mapping):
        return frozenset()
    return frozenset(
        f"{kind}/{'/'.join(map(str, key)) if isinstance(key, tuple) else key}"
        for kind, patches in replace.items() if isinstance(patches, Mapping) for key in patches
    )


@dataclass
class SiteTracker:
    """Guidance ranks of one sampling run: the PREDICT_NOISE wrapper starts a model evaluation,
    the CALC_COND_BATCH wrapper enters one calc_cond_batch of it (one per context window)."""

    base_replaced: frozenset[str] = frozenset()
    """The blocks every call of the run replaces (the run's own patches_replace)."""
    _counts: Counter = field(default_factory=Counter)
    _frames: list = field(default_factory=list)
    """The stack of calc_cond_batch calls being evaluated: (guidance rank, number of cond lists)."""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def new_evaluation(self) -> None:
        with self._lock:
            self._counts.clear()

    def enter(self, options: Mapping[str, Any], cond_lists: int) -> None:
        """A calc_cond_batch with ``cond_lists`` cond lists starts (per context window)."""
        with self._lock:
            frames = window_frames(options)
            rank = self._counts[frames]
            self._counts[frames] += 1
            self._frames.append((rank, cond_lists))

    def leave(self) -> None:
        with self._lock:
            if self._frames:
                self._frames.pop()

    def site(self, options: Mapping[str, Any]) -> tuple[CallSite, int | None]:
        """The site of a model call with these transformer_options, and the number of cond lists
        of the calc_cond_batch it runs in (None: called outside one)."""
        rank, lists = self._frames[-1] if self._frames else (0, None)
        replaced = tuple(sorted(replaced_blocks(options) - self.base_replaced))
        return CallSite(window_frames(options), rank, replaced), lists


def explain_misses(stats: Mapping[str, int], site_misses: Mapping[tuple[str, Any], int]) -> list[str]:
    """One line per reason the run's strategies found no cache and ran FULL (for the log and
    the Calibrate node's summary)."""
    lines = []
    by_kind: Counter = Counter()
    for (name, site), n in site_misses.items():
        what = "AST" if name.startswith("ast") else "WA-RS"
        kind = "window" if getattr(site, "windowed", False) else "guidance"
        by_kind[(kind, what)] += n
    for (kind, what), n in sorted(by_kind.items()):
        if kind == "window":
            lines.append(f"context windows shift from step to step under this schedule: {what} ran FULL for {n} "
                         "layer calls whose window did not run at the step they read")
        else:
            lines.append(f"guidance calls (skip-layer guidance and the like) that did not run at the step their plan "
                         f"reads (e.g. before their start_percent): {what} ran FULL for {n} layer calls")
    skipped = stats.get("ast_skipped_step", 0) + stats.get("residual_skipped_step", 0)
    if skipped:
        lines.append(f"no model call ran at the step AST or WA-RS reads (a step cache such as EasyCache skipped it): "
                     f"{skipped} layer calls ran FULL")
    outer = stats.get("ast_outer", 0) + stats.get("residual_outer", 0)
    if outer:
        lines.append(f"another attention override (core Model Sparse Attention) computed the layer at the step AST or "
                     f"WA-RS reads, so FastAttn had no cache of it: {outer} layer calls ran FULL")
    if stats.get("outer_computed"):
        lines.append(f"{stats['outer_computed']} layer calls were computed by an attention override around FastAttn's "
                     "(core Model Sparse Attention), not by FastAttn's plan")
    if stats.get("asc_not_cfg_pair"):
        lines.append(f"calls whose conds are not one positive and one negative (Dual CFG, PerpNeg's extra conds): "
                     f"ASC computed every cond instead ({stats['asc_not_cfg_pair']} layer calls)")
    if stats.get("asc_several_conds"):
        lines.append(f"calls with several positive conds (ConditioningCombine, area or mask conds): no single "
                     f"conditional output to share, so ASC computed the negative too ({stats['asc_several_conds']} "
                     "layer calls)")
    if stats.get("asc_cfg_parallel"):
        lines.append(f"raylight's CFG parallel runs the conditional branch on another GPU: ASC computed the "
                     f"unconditional branch itself ({stats['asc_cfg_parallel']} layer calls)")
    if stats.get("asc_miss"):
        lines.append(f"ASC found no conditional output of the same call at this step: {stats['asc_miss']} "
                     "unconditional layer calls ran FULL (ComfyUI ran cond and uncond in separate calls, as it does "
                     "when memory is short for both in one batch: a smaller batch lets them share a call; or on "
                     "other devices)")
    return lines


def context_windows(model_options: Mapping[str, Any], latent_shape: tuple[int, ...],
                    steps: int) -> list[list[tuple[int, ...]]] | None:
    """Per sampler step, the frames of each context window ComfyUI's context handler (the
    Context Windows nodes) will evaluate for a latent of ``latent_shape``, causal anchor first as
    in ``window_frames``; None when the model has no context handler or the latent is short
    enough to run whole. Asks the handler's own schedule, step by step (uniform schedules shift
    their windows with the step)."""
    handler = model_options.get("context_handler")
    schedule = getattr(handler, "context_schedule", None)
    dim = getattr(handler, "dim", None)
    if schedule is None or dim is None or dim >= len(latent_shape):
        return None
    frames = int(latent_shape[dim])
    if frames <= handler.context_length:
        return None
    anchored = getattr(handler, "causal_window_fix", False)
    per_step = []
    for step in range(max(steps, 1)):
        probe = copy.copy(handler)
        probe._step = step
        windows = schedule.func(frames, probe, {})
        per_step.append([
            ((w[0] - 1,) if anchored and w[0] >= 1 else ()) + tuple(int(i) for i in w) for w in windows
        ])
    return per_step
