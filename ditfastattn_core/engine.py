"""The single entry point: one attention call under one strategy.

``attend`` takes q, k, v in either ComfyUI layout, the strategy chosen for this (step, layer),
the per-call context and the run state, and returns the attention output in the layout the
caller expects. Whatever a strategy needs but cannot have (no residual yet, no previous
output, nothing to share with) falls back to the next exact computation, and the state counts
the fallback; a fallback is never a guess. Sol-Attn (letter S) is dense where it saves nothing,
where the call has no token layout, where no comfy-kitchen kernel is installed or where its
kernel fails (``sparse_no_gain``, ``sparse_no_layout``, ``sparse_unavailable``, ``sparse_failed``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import sparse
from .context import CallContext, Chunk
from .state import CacheKey, RunState
from .strategies import COND, UNCOND, Cache, Compute, Strategy

DenseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""Dense attention on (B, H, L, D) tensors; the caller binds scale, masks and backend."""


def sdpa_dense(scale: float | None = None) -> DenseFn:
    def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    return dense


def to_heads(x: torch.Tensor, heads: int, skip_reshape: bool) -> torch.Tensor:
    """ComfyUI's (B, L, H*D) or already-split (B, H, L, D) -> (B, H, L, D) view."""
    if skip_reshape:
        if x.dim() != 4:
            raise ValueError(f"skip_reshape expects (B, H, L, D), got shape {tuple(x.shape)}")
        return x
    if x.dim() != 3 or x.shape[-1] % heads:
        raise ValueError(f"expected (B, L, heads*D) with {heads} heads, got shape {tuple(x.shape)}")
    b, n, hd = x.shape
    return x.view(b, n, heads, hd // heads).transpose(1, 2)


def from_heads(x: torch.Tensor, skip_output_reshape: bool) -> torch.Tensor:
    if skip_output_reshape:
        return x
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class _Call:
    """One attend() call: the rows, the caches and the output being assembled."""

    def __init__(self, q, k, v, layer: int, ctx: CallContext, state: RunState, dense: DenseFn):
        self.q, self.k, self.v = q, k, v
        self.layer, self.ctx, self.state, self.dense = layer, ctx, state, dense
        self.step = ctx.step
        self.chunks = ctx.chunks(q.shape[0])
        self.out: list[torch.Tensor | None] = [None] * len(self.chunks)
        self.whole: torch.Tensor | None = None
        """The output of a computation that covered every row, when there was one."""

    def keeps_output(self) -> bool:
        """Whether a later AST step reads this call's output (unless the caller keeps the
        whole module's output instead)."""
        return not self.ctx.module_outputs and self.state.keeps_output(self.step, self.layer)

    def shape(self, c: Chunk) -> torch.Size:
        return torch.Size((c.size, *self.q.shape[1:3], self.v.shape[-1]))

    def window(self):
        tokens = self.ctx.tokens
        if tokens is not None and tokens.seq_len != self.q.shape[2]:
            raise ValueError(
                f"attention over {self.q.shape[2]} tokens, but the call's token layout has {tokens.seq_len}"
            )
        return self.ctx.bound_window

    def rows(self, chunks: list[Chunk]) -> torch.Tensor | slice:
        if len(chunks) == len(self.chunks):
            return slice(None)
        if len(chunks) == 1:
            return chunks[0].rows
        return torch.cat([torch.arange(c.rows.start, c.rows.stop) for c in chunks]).to(self.q.device)

    def run(self, chunks: list[Chunk], fn, result: bool = True) -> list[torch.Tensor]:
        """Run ``fn(q, k, v)`` once on the rows of ``chunks``; split the result per chunk
        (views, so that a result covering every row can be returned without a copy)."""
        if not chunks:
            return []
        rows = self.rows(chunks)
        o = fn(self.q[rows], self.k[rows], self.v[rows])
        if result and len(chunks) == len(self.chunks):
            self.whole = o
        return list(o.split([c.size for c in chunks], dim=0))

    def assemble(self) -> torch.Tensor:
        whole = self.whole
        if whole is not None and all(
            o.data_ptr() == whole[c.rows].data_ptr() for o, c in zip(self.out, self.chunks, strict=True)
        ):
            return whole
        return self.out[0] if len(self.out) == 1 else torch.cat(self.out, dim=0)

    def window_fn(self, q, k, v):
        return self.ctx.window_kernel(q)(q, k, v, self.ctx.bound_window)

    def sparse_refusal(self) -> str | None:
        """Why this call cannot run Sol-Attn (letter S), or None: the reason is the name its
        dense fallback is counted under (``sparse_<reason>``)."""
        tokens = self.ctx.tokens
        if tokens is None or tokens.seq_len != self.q.shape[2]:
            return "no_layout"  # no text span to keep exact: dense rather than a guess
        if not sparse.saves(tokens):
            return "no_gain"  # every block exact anyway: dense is the same, and cheaper
        if not sparse.available():
            return "unavailable"
        return None

    def sparse_fn(self, q, k, v):
        return sparse.sol_attention(q, k, v, self.ctx.tokens)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    strategy: Strategy,
    layer: int,
    ctx: CallContext,
    state: RunState,
    *,
    heads: int = 1,
    skip_reshape: bool = True,
    skip_output_reshape: bool = True,
    dense: DenseFn | None = None,
) -> torch.Tensor:
    """Attention for ``layer`` at ``ctx.step`` under ``strategy``, reading and filling
    ``state``. Layouts as ComfyUI's attention functions: (B, L, H*D) in and out unless
    ``skip_reshape`` / ``skip_output_reshape``."""
    qh, kh, vh = (to_heads(t, heads, skip_reshape) for t in (q, k, v))
    if kh.shape[:3] != qh.shape[:3] or vh.shape[:3] != qh.shape[:3]:
        raise ValueError(
            f"self-attention needs q, k, v of one shape, got {tuple(qh.shape)}, "
            f"{tuple(kh.shape)}, {tuple(vh.shape)}"
        )
    call = _Call(qh, kh, vh, layer, ctx, state, dense or sdpa_dense())
    if ctx.step is None:
        state.count("unmapped")
        out = call.dense(qh, kh, vh)
    else:
        out = _execute(call, strategy)
        if skip_output_reshape and call.keeps_output() and not state.keeps_copies:
            out = out.clone()  # the caller gets its own tensor; the cached one stays intact
    return from_heads(out, skip_output_reshape)


def _execute(call: _Call, strategy: Strategy) -> torch.Tensor:
    state, step, layer = call.state, call.step, call.layer
    chunks = call.chunks
    if strategy.uses_window:
        call.window()  # shape errors surface before anything is computed

    # 1. CFG sharing: which unconditional chunks copy a conditional output.
    copy_from = cfg_sources(strategy, layer, call.ctx, chunks, state, (*call.q.shape[1:3], call.v.shape[-1]),
                            count=True)
    base = strategy.without_cfg_sharing

    # 2. What each remaining chunk computes (the strategy's ``Compute``): the cached output,
    #    window (+ residual, where the strategy reads one), or dense; a missing cache falls
    #    back to dense, counted under its reason.
    dense_chunks, window_chunks, sparse_chunks, residuals, reused = [], [], [], {}, set()
    refusal = call.sparse_refusal() if base.compute is Compute.SPARSE else None
    for i, c in enumerate(chunks):
        if i in copy_from:
            continue
        key = c.cache_key(layer)
        if base.compute is Compute.REUSE:
            prev = state.previous_output(step, key, call.shape(c))
            if prev is not None:
                reused.add(i)
                call.out[i] = prev if state.keeps_copies else prev.clone()
                continue
            state.miss_cache(Cache.OUTPUT, step, key)
        elif base.compute is Compute.WINDOW:
            r = state.residual(step, key, call.shape(c)) if base.reads_window_residual else None
            if r is not None or not base.reads_window_residual:
                window_chunks.append(i)
                residuals[i] = r
                continue
            state.miss_cache(Cache.RESIDUAL, step, key)
        elif base.compute is Compute.SPARSE:
            if refusal is None:
                sparse_chunks.append(i)
                continue
            state.miss(f"sparse_{refusal}")
        elif base.compute is not Compute.DENSE:
            raise NotImplementedError(f"the engine has no computation for {base.compute}")
        dense_chunks.append(i)

    # 3. Compute, batching the rows that share an action; Sol-Attn first, so that a call no
    #    kernel could compute joins the dense rows (counted).
    try:
        for i, o in zip(sparse_chunks, call.run([chunks[i] for i in sparse_chunks], call.sparse_fn), strict=True):
            call.out[i] = o
    except sparse.SparseFailed:
        for _ in sparse_chunks:
            state.miss("sparse_failed")
        dense_chunks, sparse_chunks = sorted(dense_chunks + sparse_chunks), []
    for i, o in zip(dense_chunks, call.run([chunks[i] for i in dense_chunks], call.dense), strict=True):
        call.out[i] = o
    refresh = [] if state.frozen else [
        i for i in dense_chunks if state.keeps_residual(step, layer, chunks[i].branch)
    ]
    for i, w in zip(refresh, call.run([chunks[i] for i in refresh], call.window_fn, result=False), strict=True):
        state.put_residual(step, chunks[i].cache_key(layer), call.out[i] - w)
    for i, w in zip(window_chunks, call.run([chunks[i] for i in window_chunks], call.window_fn), strict=True):
        r = residuals[i]
        if r is None:
            call.out[i] = w
        else:
            # w is the kernel's fresh output: add in place, unless autograd may be recording
            # (it refuses in-place writes on the split views it tracks)
            call.out[i] = w + r if torch.is_grad_enabled() else w.add_(r)
    for i, src in copy_from.items():
        call.out[i] = call.out[chunks.index(src)] if isinstance(src, Chunk) else src[0]

    # 4. Publish for a separate unconditional call, keep outputs a later AST step reads.
    if strategy.shares_cfg and call.ctx.cfg_pair and len(chunks) == 1 and chunks[0].branch == COND:
        state.publish_cond(step, chunks[0].cache_key(layer), call.out[0])
    if call.keeps_output():
        _keep(state, step, layer, chunks, call.out, copy_from, reused)
    for i in range(len(chunks)):
        state.count(_action(i, copy_from, window_chunks, dense_chunks, sparse_chunks))
    return call.assemble()


Source = Chunk | tuple[torch.Tensor, CacheKey]
"""Where an unconditional chunk's output comes from under CFG sharing: the call's conditional
chunk, or the output (and key) a separate conditional call of the same site published."""


def cfg_sources(strategy: Strategy, layer: int, ctx: CallContext, chunks: list[Chunk], state: RunState,
                row_shape: tuple[int, ...] | None, count: bool = False) -> dict[int, Source]:
    """The one rule of CFG sharing (ASC): per unconditional chunk index, the conditional output
    it copies. Only in a call whose chunks are a CFG pair; from the call's single conditional
    chunk, else from a separate conditional call of the same call site at this step.
    ``row_shape``: one row's attention output shape (None: any; the module-output keeper
    asks only where the shared output came from). ``count``: count what cannot be shared (the
    computing call does; the module-output keeper asks the same question again)."""
    if not strategy.shares_cfg:
        return {}
    if ctx.cfg_elsewhere:
        if count:
            state.count("asc_cfg_parallel", sum(c.branch == UNCOND for c in chunks))
        return {}
    if not ctx.cfg_pair:
        if count and len(chunks) > 1:
            state.count("asc_not_cfg_pair")
        return {}
    conds = [c for c in chunks if c.branch == COND]
    unconds = [i for i, c in enumerate(chunks) if c.branch == UNCOND]
    if len(conds) == 1 and unconds:
        return {i: conds[0] for i in unconds}
    if len(conds) > 1 and unconds:
        if count:
            state.count("asc_several_conds")
        return {}
    if not conds and len(unconds) == 1:
        i = unconds[0]
        shape = None if row_shape is None else torch.Size((chunks[i].size, *row_shape))
        shared = state.shared(ctx.step, layer, ctx.site, shape)
        if shared is not None:
            return {i: shared}
        if count:
            state.miss_cache(Cache.SHARED_COND, ctx.step, chunks[i].cache_key(layer))
    return {}


def _keep(state: RunState, step: int, layer: int, chunks: list[Chunk], outs: list[torch.Tensor],
          copy_from: dict[int, Source], reused: set[int]) -> None:
    """Keep each chunk's output for the next step's AST, each tensor once: a reused output
    stays the previous step's entry, a copied unconditional output is the conditional's."""
    for i, c in enumerate(chunks):
        if i in reused:
            state.carry_output(step, c.cache_key(layer))
        elif i not in copy_from:
            state.put_output(step, c.cache_key(layer), outs[i])
    for i, src in copy_from.items():
        source = src.cache_key(layer) if isinstance(src, Chunk) else src[1]
        if not state.alias_output(step, chunks[i].cache_key(layer), source):
            state.put_output(step, chunks[i].cache_key(layer), outs[i])


def _action(i: int, copy_from, window_chunks, dense_chunks, sparse_chunks) -> str:
    if i in copy_from:
        return "cfg_copy"
    if i in window_chunks:
        return "window"
    if i in sparse_chunks:
        return "sparse"
    if i in dense_chunks:
        return "dense"
    return "reuse"


# --- module outputs: callers that own the whole attention module (PixArt) -----------------
# AST then reuses the module's output (projections included); the rules of what is kept and
# read are the engine's own (``_keep``, ``cfg_sources``), applied to module outputs.


def reuse_module_output(strategy: Strategy, layer: int, ctx: CallContext, state: RunState,
                        shape: torch.Size) -> torch.Tensor | None:
    """AST served before the module computes anything: this layer's module output of the
    previous step for every chunk, else None (the module then computes the layer, and the
    engine counts the miss)."""
    if not ctx.module_outputs or ctx.step is None or not strategy.reads_previous_output:
        return None
    chunks = ctx.chunks(shape[0])
    outs = [state.previous_output(ctx.step, c.cache_key(layer), torch.Size((c.size, *shape[1:]))) for c in chunks]
    if any(o is None for o in outs):
        return None
    keep = state.keeps_output(ctx.step, layer)  # AST again at the next step
    for c in chunks:
        state.count("reuse")
        if keep:
            state.carry_output(ctx.step, c.cache_key(layer))  # kept once for both steps
    if len(outs) > 1:
        return torch.cat(outs)
    return outs[0] if state.keeps_copies else outs[0].clone()


def keep_module_output(strategy: Strategy, layer: int, ctx: CallContext, state: RunState,
                       out: torch.Tensor) -> torch.Tensor:
    """Keep the module output a later AST step reuses, by the engine's rules (a copied
    unconditional output is kept as the conditional's); the caller gets its own tensor."""
    if not ctx.module_outputs or ctx.step is None or not state.keeps_output(ctx.step, layer):
        return out
    chunks = ctx.chunks(out.shape[0])
    copy_from = cfg_sources(strategy, layer, ctx, chunks, state, None)
    _keep(state, ctx.step, layer, chunks, [out[c.rows] for c in chunks], copy_from, set())
    return out if state.keeps_copies else out.clone()
