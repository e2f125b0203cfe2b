"""The strategy table: everything about the per-(step, layer) attention strategies of
DiTFastAttn (the paper's five, window attention without its residual, the paper's
ablation, and Sol-Attn block-sparse attention from comfy-kitchen), in one place.

A strategy is a row of ``Strategy``: its plan letter, its label and colour in the editor's
heatmap, what it computes (``Compute``), whether it shares the conditional branch's result
with the unconditional one, the caches it reads and writes, and its rank among calibration
candidates. Its cost, its availability during calibration, the Calibrate node's candidate
inputs, the default candidates and the heatmap legend are all derived from these columns.
The letters are part of the plan file format and must never change meaning.
"""

from __future__ import annotations

import enum
from typing import NamedTuple


class Compute(enum.Enum):
    """What a strategy computes for the rows it does not copy from the conditional branch,
    with its attention FLOPs: ``fixed + per_window * window_fraction + per_sparse *
    sparse_fraction`` (1.0 = dense)."""

    DENSE = ("dense", 1.0, 0.0, 0.0)
    """Full attention."""
    WINDOW = ("window", 0.0, 1.0, 0.0)
    """Window attention plus the residual ``full - window`` cached at the layer's last FULL step."""
    REUSE = ("reuse", 0.0, 0.0, 0.0)
    """The layer's output of the previous step; no attention at all."""
    SPARSE = ("sparse", 0.0, 0.0, 1.0)
    """Block-sparse attention (Sol-Attn, ``sparse.py``): routed key blocks exact, the others one
    pooled term each; its fraction is ``sparse.cost_fraction`` of the call's token layout."""

    def __new__(cls, name: str, fixed: float, per_window: float, per_sparse: float) -> Compute:
        member = object.__new__(cls)
        member._value_ = name
        member.fixed, member.per_window, member.per_sparse = fixed, per_window, per_sparse
        return member

    def flops(self, window_fraction: float, sparse_fraction: float = 1.0) -> float:
        """``sparse_fraction`` defaults to dense: where the layout is unknown a sparse call is
        not assumed to save anything."""
        return self.fixed + self.per_window * window_fraction + self.per_sparse * sparse_fraction


class Cache(enum.Enum):
    """The per-run caches a strategy reads or writes (``RunState`` holds them)."""

    RESIDUAL = "residual"
    """Per layer and CFG branch: ``full - window`` from the layer's last FULL step."""
    OUTPUT = "output"
    """Per layer: the attention output of the previous step."""
    SHARED_COND = "shared_cond"
    """Per layer, this step: the conditional output, for an unconditional call made separately."""


COND = 0
"""ComfyUI's ``cond_or_uncond`` value for the conditional branch."""
UNCOND = 1
"""ComfyUI's ``cond_or_uncond`` value for the unconditional branch."""


class _Row(NamedTuple):
    letter: str
    label: str
    colour: str
    compute: Compute
    shares_cfg: bool
    reads: tuple[Cache, ...]
    writes: tuple[Cache, ...]
    candidate_rank: int | None
    description: str
    offered: bool = True
    switch: int | None = None
    default_on: bool = True


class Strategy(enum.Enum):
    """How one attention layer is computed at one step. The enum value is the plan letter."""

    FULL = _Row(
        "F", "FULL", "#5b6270", Compute.DENSE, shares_cfg=False, reads=(), writes=(Cache.RESIDUAL,),
        candidate_rank=None, description="FULL: dense attention; refreshes the window residual a later step reads.",
    )
    WA_RS = _Row(
        "W", "WA-RS", "#3b82f6", Compute.WINDOW, shares_cfg=False, reads=(Cache.RESIDUAL,), writes=(),
        candidate_rank=2, description="WA-RS: window attention plus the residual cached at the last full step.",
        switch=2,
    )
    ASC = _Row(
        "C", "ASC", "#f59e0b", Compute.DENSE, shares_cfg=True, reads=(Cache.SHARED_COND,),
        writes=(Cache.SHARED_COND,), candidate_rank=3,
        description="ASC: attention for the conditional rows only, copied to the unconditional.", switch=3,
    )
    WA_RS_ASC = _Row(
        "X", "WA-RS+ASC", "#10b981", Compute.WINDOW, shares_cfg=True, reads=(Cache.RESIDUAL, Cache.SHARED_COND),
        writes=(Cache.SHARED_COND,), candidate_rank=1,
        description="WA-RS + ASC: window attention with residual (conditional residual), conditional rows "
        "only, copied to the unconditional.", switch=1,
    )
    AST = _Row(
        "T", "AST", "#ef4444", Compute.REUSE, shares_cfg=False, reads=(Cache.OUTPUT,), writes=(),
        candidate_rank=0, description="AST: reuse a layer's output from the previous step; no attention at all.",
        switch=0,
    )
    WA = _Row(
        "A", "WA", "#a5b4fc", Compute.WINDOW, shares_cfg=False, reads=(), writes=(), candidate_rank=4,
        description="WA: window attention alone, without the residual (the paper's ablation of WA-RS).",
        offered=False,
    )
    SPARSE = _Row(
        "S", "Sol-Attn", "#8b5cf6", Compute.SPARSE, shares_cfg=False, reads=(), writes=(), candidate_rank=5,
        description="Sol-Attn: block-sparse attention from comfy-kitchen (64-token blocks; the top quarter of key "
        "blocks, the diagonal and text exact, one pooled term per other block). Off by default: it saves "
        "only on long sequences, and is fast only on CUDA sm80+ in fp16/bf16 with head dim 128.",
        switch=4, default_on=False,
    )

    def __new__(
        cls, letter: str, label: str, colour: str, compute: Compute, shares_cfg: bool,
        reads: tuple[Cache, ...], writes: tuple[Cache, ...], candidate_rank: int | None, description: str,
        offered: bool = True, switch: int | None = None, default_on: bool = True,
    ) -> Strategy:
        member = object.__new__(cls)
        member._value_ = letter
        member.label = label
        """Its name in the editor (heatmap legend, hover)."""
        member.colour = colour
        member.compute = compute
        member.shares_cfg = shares_cfg
        """The unconditional rows copy the conditional rows' result (ASC)."""
        member.reads = frozenset(reads)
        member.writes = frozenset(writes) | {Cache.OUTPUT}
        """Every strategy's output is kept when the next step reuses it (AST)."""
        member.candidate_rank = candidate_rank
        """Calibration tries candidates by rank, cheapest first; None: not a candidate, but
        what a layer gets when no candidate passes. Sol-Attn's cost depends on the sequence
        length, so where a calibrator sees the call it tries it at its cost's place instead
        (``calibrate.trial_order``); its rank, last, holds where it does not (paper mode)."""
        member.description = description
        """One line for tooltips (the Calibrate node's candidate inputs)."""
        member.offered = offered
        """The Calibrate node shows it and it is a default candidate; False for ablations,
        which calibration still takes when asked (``bench/ablations.py``)."""
        member.switch = switch
        """Where the Calibrate node's ``use_...`` switch of an offered candidate sits among the
        switches. Saved workflows keep widget values by position, so a switch keeps its number
        for ever: a new strategy takes the next free number and its switch is appended after
        the node's other inputs, optional (``SWITCHES_IN_PLACE``)."""
        member.default_on = default_on
        """An offered candidate the node's switch starts on, and a default candidate. A new
        strategy starts off, so a saved workflow without its switch calibrates as before."""
        return member

    @property
    def letter(self) -> str:
        return self.value

    @classmethod
    def from_letter(cls, letter: str) -> Strategy:
        try:
            return cls(letter)
        except ValueError:
            known = ", ".join(f"{s.value}={s.name}" for s in cls)
            raise ValueError(f"unknown strategy letter {letter!r} (known: {known})") from None

    @property
    def uses_window(self) -> bool:
        return self.compute is Compute.WINDOW

    @property
    def reads_window_residual(self) -> bool:
        """Adds the residual ``full - window`` cached at the layer's last FULL step (WA-RS)."""
        return Cache.RESIDUAL in self.reads

    @property
    def refreshes_residual(self) -> bool:
        """A FULL step: residuals read later are computed here."""
        return Cache.RESIDUAL in self.writes

    @property
    def reads_previous_output(self) -> bool:
        return Cache.OUTPUT in self.reads

    @property
    def without_cfg_sharing(self) -> Strategy:
        """The strategy a CFG-sharing one runs as when there is no branch to share with."""
        if not self.shares_cfg:
            return self
        return next(s for s in Strategy if not s.shares_cfg and s.compute is self.compute
                    and s.reads == self.reads - {Cache.SHARED_COND})

    def reads_residual(self, branch: int) -> bool:
        """Whether this strategy reads the window residual of CFG branch ``branch`` (0 = cond,
        1 = uncond, 2+ = a guider's extra conds): a sharing strategy copies the unconditional
        rows, so it computes, and reads, every other branch's."""
        return self.reads_window_residual and (branch != UNCOND or not self.shares_cfg)

    def cost(self, window_fraction: float, has_cfg: bool, sparse_fraction: float = 1.0) -> float:
        """Attention FLOPs of one layer call (1.0 = dense), per batch of both CFG branches.
        Without CFG a sharing strategy runs as its non-sharing form."""
        flops = self.compute.flops(window_fraction, sparse_fraction)
        return flops / 2 if self.shares_cfg and has_cfg else flops


CANDIDATE_ORDER: tuple[Strategy, ...] = tuple(
    sorted((s for s in Strategy if s.candidate_rank is not None), key=lambda s: s.candidate_rank)
)
"""Algorithm 1's try order: cheapest first; FULL is what remains when none passes."""

DEFAULT_CANDIDATES: tuple[Strategy, ...] = tuple(s for s in CANDIDATE_ORDER if s.offered and s.default_on)
"""The candidates calibration takes when none are named: the offered ones that start on."""

OFFERED_CANDIDATES: tuple[Strategy, ...] = DEFAULT_CANDIDATES
"""The former name of ``DEFAULT_CANDIDATES``, kept for callers that take it as their default
(``comfy_bridge.calibration.CalibrationRequest``)."""

SWITCHES: tuple[Strategy, ...] = tuple(
    sorted((s for s in CANDIDATE_ORDER if s.offered), key=lambda s: s.switch)
)
"""The offered candidates in the order of their Calibrate node switches (``Strategy.switch``)."""

SWITCHES_IN_PLACE = 4
"""Switches numbered below this sit where the node had them when workflows were first saved
(between ``mode`` and ``window``); later ones come after every other input."""


def legend() -> list[dict[str, str]]:
    """Every strategy's letter, label and colour, in table order: what the editor's heatmap
    draws a plan with (sent with the plan, so the frontend holds no copy of this table)."""
    return [{"letter": s.letter, "label": s.label, "colour": s.colour} for s in Strategy]
