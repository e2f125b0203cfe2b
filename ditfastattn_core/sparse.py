"""Sol-Attn block-sparse attention (comfy-kitchen's ``sol_attn``) for plan letter S.

What letter S computes, frozen with the letter (a plan file stores only the letter): Sol-Attn
over 64-token blocks with top-k routing, ``TOPK_RATIO`` of the non-sink key blocks per query
block exact, the diagonal block and its two neighbours exact, every other key block one pooled
term (``tail``). Tokens outside the image span (text in joint attention, reference images) are
exact in both directions: their key blocks are ``sink_blocks`` and their query blocks
``sink_q``, as window attention keeps them global. Where they sit on both sides of the image
(text first, reference images after), the call is permuted so they come first, and back.

Top-k rather than the ``tau`` threshold: the kept fraction then follows from the token layout
alone, so a plan's cost is known before sampling (``cost_fraction``), as a window's is.

Which kernel runs it: comfy-kitchen's fused op where it accepts the call (CUDA sm80+, fp16 or
bf16, head dim 128; ``sol_attn_is_available``), checked once per device and dtype against the
eager reference; everywhere else the eager reference function itself
(``comfy_kitchen.backends.eager.sol_attn.sol_attn``, imported lazily: the public op's call rule
refuses head dims other than 128 even on the CPU). The reference computes the same block
selection in float32 but materialises the dense scores: exact to the algorithm, so calibration
and quality measurements hold, and no faster than dense attention (said once per process).
Without a comfy-kitchen that has ``sol_attn`` the strategy is unavailable. A kernel that fails
is never fatal: the fused one is disabled for the process (one warning line) and the call runs
on the reference; where that fails too (its size guard, or out of memory: it holds the dense
scores in float32), ``SparseFailed`` tells the engine to run the call dense and count it.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .window import TokenLayout

BLOCK = 64
"""Sol-Attn's block length in tokens (fixed in its kernels)."""
TOPK_RATIO = 0.25
"""Fraction of the non-sink key blocks each query block keeps exact (besides the diagonal)."""
FUSED_DTYPES = (torch.float16, torch.bfloat16)
FUSED_HEAD_DIM = 128
CHECK_COSINE = 0.99
"""The fused kernel computes in INT8 (comfy-kitchen: cosine ~0.999 to the reference); below this
on the check input it is not trusted."""

log = logging.getLogger("ditfastattn")
_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError

SolAttnFn = Callable[..., torch.Tensor]


class SparseFailed(RuntimeError):
    """No Sol-Attn kernel could compute this call; the engine runs it dense and counts it."""


# --- where the exact blocks are: the token layout ----------------------------------------------


@dataclass(frozen=True)
class Arrangement:
    """How one call's sequence is laid out for Sol-Attn: an optional permutation that brings
    the global tokens together, and the block range they occupy then."""

    seq_len: int
    moved_image: tuple[int, int] | None
    """None: the sequence as it is. Else the image span ``[start, stop)`` that is moved behind
    the global tokens before and after it (``permutation``)."""
    sinks: tuple[int, int]
    """``[start, end)`` blocks holding the global tokens (key sinks and query sinks); (0, 0): none."""

    @property
    def blocks(self) -> int:
        return -(-self.seq_len // BLOCK)

    def permutation(self, device: torch.device) -> torch.Tensor | None:
        """The call's token order for Sol-Attn (None: as it is); its argsort puts it back."""
        if self.moved_image is None:
            return None
        start, stop = self.moved_image
        return torch.cat([torch.arange(0, start), torch.arange(stop, self.seq_len),
                          torch.arange(start, stop)]).to(device)


def arrange(layout: TokenLayout) -> Arrangement:
    """The arrangement of ``layout``: global tokens on one side of the image stay where they are
    (their blocks are the sinks); on both sides they are moved in front of the image."""
    n, start, stop = layout.seq_len, layout.image_start, layout.image_stop
    before, after = start, n - stop
    if before and after:
        return Arrangement(n, (start, stop), (0, -(-(before + after) // BLOCK)))
    if before:
        return Arrangement(n, None, (0, -(-before // BLOCK)))
    if after:
        return Arrangement(n, None, (stop // BLOCK, -(-n // BLOCK)))
    return Arrangement(n, None, (0, 0))


# --- what it costs --------------------------------------------------------------------------------


def topk_blocks(non_sink: int) -> int:
    """Key blocks a query block keeps by score under top-k (Sol-Attn's rule): the ratio of the
    non-sink blocks, rounded, at least 1 and at most all but one; none when there is at most one."""
    return max(0, min(non_sink - 1, max(1, round(TOPK_RATIO * non_sink))))


def computed_pairs(layout: TokenLayout) -> int:
    """(query, key) pairs Sol-Attn computes on ``layout``: exact keys of each query plus one per
    pooled block, plus the routing proxy (one score per query block and key block). An upper
    bound: top-k blocks that land on the diagonal are counted as extra ones."""
    a = arrange(layout)
    n, t = a.blocks, a.seq_len
    size = [min(BLOCK, t - b * BLOCK) for b in range(n)]
    s0, s1 = a.sinks
    sinks = set(range(s0, s1))
    kk = topk_blocks(n - len(sinks))
    total = n * n  # routing proxy
    for i in range(n):
        if i in sinks:
            total += size[i] * t  # a sink query block attends everything exactly
            continue
        forced = sinks | {j for j in (i - 1, i, i + 1) if 0 <= j < n}
        exact_blocks = min(n, len(forced) + kk)
        exact_tokens = min(t, sum(size[j] for j in forced) + kk * BLOCK)
        total += size[i] * (exact_tokens + n - exact_blocks)
    return total


def keep_fraction(layout: TokenLayout) -> float:
    """Sol-Attn's attention FLOPs on ``layout`` relative to dense (QK^T and PV, pooled terms and
    routing included); above 1 where every block is exact anyway (short sequences)."""
    return computed_pairs(layout) / layout.seq_len**2


def saves(layout: TokenLayout) -> bool:
    """Whether Sol-Attn computes less than dense attention on ``layout``; where it does not, the
    engine runs the call dense (exact, and cheaper)."""
    return keep_fraction(layout) < 1.0


def cost_fraction(layout: TokenLayout) -> float:
    """What letter S costs on ``layout``: Sol-Attn's fraction where it saves, else dense (1.0)."""
    return min(1.0, keep_fraction(layout))


# --- which kernel ---------------------------------------------------------------------------------


@functools.cache
def _kitchen():
    """comfy-kitchen if it has ``sol_attn``, else None (not installed, or older than the op)."""
    try:
        kitchen = importlib.import_module("comfy_kitchen")
    except Exception:  # not installed, or installed but unloadable here
        return None
    return kitchen if hasattr(kitchen, "sol_attn") else None


@functools.cache
def _reference() -> SolAttnFn | None:
    """comfy-kitchen's eager Sol-Attn function (any device, dtype and head dim), or None."""
    if _kitchen() is None:
        return None
    try:
        return importlib.import_module("comfy_kitchen.backends.eager.sol_attn").sol_attn
    except Exception:
        return None


def available() -> bool:
    """Whether letter S can run here at all (a comfy-kitchen with ``sol_attn``)."""
    return _reference() is not None


_lock = threading.Lock()
_fused_checked: dict[tuple[torch.device, torch.dtype], bool] = {}
FUSED_DISABLED: dict[str, str] = {}
"""Why the fused kernel was disabled for this process, when it was."""


def fused_refusal(q: torch.Tensor) -> str | None:
    """Why comfy-kitchen's fused op cannot take ``q`` ((B, H, L, D)), or None if it can."""
    kitchen = _kitchen()
    if kitchen is None:
        return "comfy-kitchen has no sol_attn"
    if q.dtype not in FUSED_DTYPES or q.shape[-1] != FUSED_HEAD_DIM:
        return f"it needs fp16/bf16 with head dim {FUSED_HEAD_DIM}, got {str(q.dtype).removeprefix('torch.')} " \
               f"head dim {q.shape[-1]}"
    if FUSED_DISABLED:
        return f"it failed on this machine ({FUSED_DISABLED['fused']})"
    try:
        ok = kitchen.sol_attn_is_available(q.device)
    except Exception as e:
        return f"its availability check failed ({_describe(e)})"
    return None if ok else f"its fused kernels need CUDA sm80+, not {q.device.type}"


def _describe(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else "no message"
    return f"{type(e).__name__}: {text}"


def _disable_fused(reason: str) -> None:
    with _lock:
        if "fused" in FUSED_DISABLED:
            return
        FUSED_DISABLED["fused"] = reason
    log.warning("FastAttn: Sol-Attn's fused kernel disabled on this machine (%s); letter S runs on "
                "comfy-kitchen's eager reference", reason)


@functools.cache
def _say_reference(reason: str) -> None:
    log.warning("FastAttn: Sol-Attn (plan letter S) runs on comfy-kitchen's eager reference here: its fused "
                "kernel cannot (%s). Same block selection, float32, no faster than dense attention", reason)


@functools.cache
def _say_failed(reason: str) -> None:
    log.warning("FastAttn: Sol-Attn could not run a call (%s); such calls run dense", reason)


def _check_fused(q: torch.Tensor) -> bool:
    """Once per device and dtype: the fused op on a small input agrees with the reference."""
    key = (q.device, q.dtype)
    with _lock:
        ok = _fused_checked.get(key)
    if ok is not None:
        return ok
    g = torch.Generator().manual_seed(0)
    shape = (1, 4 * BLOCK, 1, FUSED_HEAD_DIM)
    qs, ks, vs = (torch.randn(shape, generator=g).to(device=q.device, dtype=q.dtype) for _ in range(3))
    kwargs = dict(topk_ratio=TOPK_RATIO, sink_blocks=[0, 1], sink_q=[0, 1])
    reason = None
    try:
        got = _kitchen().sol_attn(qs, ks, vs, **kwargs).float().flatten()
        want = _reference()(qs.float(), ks.float(), vs.float(), **kwargs).flatten()
        cos = float(torch.nn.functional.cosine_similarity(got, want, dim=0))
        if not math.isfinite(cos) or cos < CHECK_COSINE:
            reason = f"its output differs from the reference (cosine {cos:.4f} < {CHECK_COSINE})"
    except _OUT_OF_MEMORY:
        raise
    except Exception as e:
        reason = _describe(e)
    with _lock:
        _fused_checked[key] = ok = reason is None
    if reason is not None:
        _disable_fused(reason)
    return ok


def sol_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Letter S on (B, H, L, D) tensors laid out as ``layout``; raises ``SparseFailed`` where no
    kernel can compute it (out of memory excepted: the caller's to handle)."""
    if _reference() is None:
        raise SparseFailed("comfy-kitchen has no sol_attn")
    a = arrange(layout)
    perm = a.permutation(q.device)
    if perm is not None:
        q, k, v = (t.index_select(2, perm) for t in (q, k, v))
    args = [t.transpose(1, 2).contiguous() for t in (q, k, v)]
    kwargs = dict(topk_ratio=TOPK_RATIO, sink_blocks=list(a.sinks), sink_q=list(a.sinks))
    out = None
    refusal = fused_refusal(q)
    if refusal is None and _check_fused(q):
        try:
            out = _kitchen().sol_attn(*args, **kwargs)
        except _OUT_OF_MEMORY:
            raise
        except Exception as e:
            _disable_fused(_describe(e))
    if out is None:
        _say_reference(refusal or fused_refusal(q) or "it failed")
        try:
            out = _reference()(*args, **kwargs)
        except Exception as e:  # out of memory included: the reference's dense scores, not the model's
            _say_failed(_describe(e))
            raise SparseFailed(_describe(e)) from e
    out = out.transpose(1, 2)
    if perm is not None:
        out = out.index_select(2, torch.argsort(perm))
    return out.to(v.dtype)
