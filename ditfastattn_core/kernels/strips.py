"""2D and 3D boxes on CPU: one masked SDPA call per key strip, without per-tile gathers.

Gathering each query tile's key box (what ``blocked`` does elsewhere) copies every key about
as many times as there are tiles that see it; on a CPU that copy costs as much as the
attention itself. Here the image keys are copied once into *strips*: for each chunk of the
grid's faster axes (columns in 2D; (row, column) pillars in 3D) the keys every query of the
chunk may see, over the whole slowest axis. The query tiles of a chunk, stacked along the
slowest axis, then see overlapping row ranges of their strip, which are strided *views* (an
overlapping ``as_strided``), so one SDPA call runs all of them.

Exact windows pad the key grid with ``radius`` zeros on every side so that every tile's box
has the same shape; an additive mask (built once per geometry) removes the padding and the
box corners. Block-aligned windows need no padding and no mask: a tile's box is the window.
Border-shifted windows need no padding either (their boxes stay inside the grid), only the mask.
Global (text) keys are merged in through the log-sum-exp the CPU flash kernel returns, so
image queries see text keys plus their window, exactly as ``Window.allowed`` says.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..window import Window

EXACT_TILE = {2: (4, 16), 3: (1, 8, 16)}
"""Query tile of exact boxes per grid rank (capped by the grid). Wider tiles waste more
masked keys in their padded boxes; narrower ones make more, smaller strips (copies of the
keys) and SDPA calls. Picked from a few shapes timed at 4096 tokens on a shared 2-core CPU
(2D: 2x16 to 16x16, 3D: 1x4x8 to 2x8x8); the differences between neighbours were within
that machine's noise, the tiles an order of magnitude off were clearly slower."""


def lse_attention_op():
    """The CPU flash kernel that also returns the log-sum-exp, if this torch has it."""
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


@dataclass(frozen=True)
class _Axis:
    """One grid axis cut into query tiles: tile ``j`` covers queries [j*tile, (j+1)*tile)
    and sees keys [starts[j], starts[j] + keys) of the key axis padded by ``pad`` in front."""

    size: int
    tile: int
    keys: int
    starts: tuple[int, ...]
    pad: tuple[int, int]

    @property
    def tiles(self) -> int:
        return len(self.starts)


@dataclass(frozen=True)
class _Run:
    """Consecutive query tiles along the slowest axis whose key starts step evenly."""

    chunk: int
    first: int
    count: int
    key_start: int
    key_step: int
    mask: torch.Tensor | None  # (1, count, nq, nk) additive, or None


@dataclass(frozen=True)
class _StripLayout:
    axes: tuple[_Axis, ...]
    runs: tuple[_Run, ...]

    @property
    def nq(self) -> int:
        return math.prod(a.tile for a in self.axes)

    @property
    def chunk_keys(self) -> int:
        return math.prod(a.keys for a in self.axes[1:])

    @property
    def chunks(self) -> int:
        return math.prod(a.tiles for a in self.axes[1:])


def strips_usable(window: Window, device_type: str) -> bool:
    """Exact 2D/3D boxes and block-aligned 3D boxes on CPU. A block-aligned 2D window keeps
    the gathered-tile route: its single SDPA call measured faster than the strips' many
    (8x8 tiles at 4096 tokens, head to head: 3.5 vs 4.5 time/FLOPs)."""
    if device_type != "cpu" or lse_attention_op() is None:
        return False
    return window.spec.dims == 3 or (window.spec.dims == 2 and window.spec.exact)


def _query_tile(window: Window) -> tuple[int, ...]:
    if not window.spec.exact:
        return tuple(min(t, s) for t, s in zip(window.spec.tile, window.grid, strict=True))
    want = EXACT_TILE[len(window.grid)]
    return tuple(max(1, min(t, s)) for t, s in zip(want, window.grid, strict=True))


def _axis(window: Window, axis: int, tile: int) -> _Axis:
    size, r = window.grid[axis], window.radius[axis]
    tiles = -(-size // tile)
    if window.spec.exact and not window.spec.shifted:
        # padded coordinates: key c sits at c + r, so tile j's box [j*t - r, j*t + t - 1 + r]
        # starts at j*t and every box has t + 2r keys
        keys = min(tile + 2 * r, size + 2 * r)
        pad = (r, max(0, tiles * tile + r - size))
        return _Axis(size, tile, keys, tuple(j * tile for j in range(tiles)), pad)
    # Boxes shifted inwards at the borders (block-aligned, border-shifted) never leave the
    # grid: a tile's keys are the span from its first query's box to its last one's, and one
    # length (the longest span) fits every tile once its start is kept inside the grid.
    first = torch.arange(tiles) * tile
    lo, _ = window.axis_box(axis, first)
    _, hi = window.axis_box(axis, (first + tile - 1).clamp(max=size - 1))
    keys = int((hi - lo).max()) + 1
    return _Axis(size, tile, keys, tuple(int(s) for s in lo.clamp(max=size - keys)), (0, 0))


def _runs_of(starts: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """Split tile indices into (first, count, step) runs of evenly stepping key starts."""
    runs, first = [], 0
    while first < len(starts):
        count = 1
        step = starts[first + 1] - starts[first] if first + 1 < len(starts) else 0
        while first + count < len(starts) and starts[first + count] - starts[first + count - 1] == step:
            count += 1
        runs.append((first, count, step if count > 1 else 0))
        first += count
    return runs


def _axis_allowed(window: Window, axis: _Axis, a: int, q: torch.Tensor, k_padded: torch.Tensor) -> torch.Tensor:
    """Per-axis part of the rule on (query, padded key) coordinates; padding is never seen
    by a real query (padded queries are dropped, they may see anything)."""
    k = k_padded - axis.pad[0]
    q_real = q < axis.size
    lo, hi = window.axis_box(a, q.clamp(max=axis.size - 1))
    ok = (k >= 0) & (k < axis.size) & (k >= lo) & (k <= hi)
    return ok | ~q_real


def _chunk_origins(axes: tuple[_Axis, ...]):
    return itertools.product(*(range(ax.tiles) for ax in axes))


def _exact_mask(window: Window, axes: tuple[_Axis, ...], chunk_origin, i0: int, count: int, dtype) -> torch.Tensor:
    """(1, count, nq, nk) additive mask of ``count`` tiles along the slowest axis of a chunk:
    the window's box per axis, as an outer product over the axes."""
    nd = len(axes)
    first = axes[0]
    q0 = torch.arange(i0, i0 + count)[:, None] * first.tile + torch.arange(first.tile)
    k0 = torch.tensor(first.starts[i0 : i0 + count])[:, None] + torch.arange(first.keys)
    ok = _axis_allowed(window, first, 0, q0[:, :, None], k0[:, None, :])  # (count, t0, k0)
    ok = ok.reshape(count, first.tile, *([1] * (nd - 1)), first.keys, *([1] * (nd - 1)))
    for a, (ax, j) in enumerate(zip(axes[1:], chunk_origin, strict=True), start=1):
        qa = j * ax.tile + torch.arange(ax.tile)
        ka = ax.starts[j] + torch.arange(ax.keys)
        oka = _axis_allowed(window, ax, a, qa[:, None], ka[None, :])  # (ta, ka)
        shape = [1] * (1 + 2 * nd)
        shape[1 + a], shape[1 + nd + a] = ax.tile, ax.keys
        ok = ok & oka.reshape(shape)
    nq = math.prod(ax.tile for ax in axes)
    ok = ok.reshape(count, nq, -1)
    return torch.zeros(ok.shape, dtype=dtype).masked_fill_(~ok, float("-inf"))[None]


@functools.lru_cache(maxsize=16)
def _strip_layout(window: Window, dtype: torch.dtype) -> _StripLayout:
    tile = _query_tile(window)
    axes = tuple(_axis(window, a, t) for a, t in enumerate(tile))
    runs = []
    shared: dict[bytes, torch.Tensor] = {}  # equal masks (interior chunks) are stored once
    for chunk, origin in enumerate(_chunk_origins(axes[1:])):
        for i0, count, step in _runs_of(axes[0].starts):
            mask = None
            if window.spec.exact:
                mask = _exact_mask(window, axes, origin, i0, count, dtype)
                mask = shared.setdefault(mask.view(torch.uint8).numpy().tobytes(), mask)
            runs.append(_Run(chunk, i0, count, axes[0].starts[i0], step, mask))
    return _StripLayout(axes, tuple(runs))


def _strips(t: torch.Tensor, window: Window, lay: _StripLayout) -> torch.Tensor:
    """Image keys (or values) of (B, H, L, D) as (chunks, B*H, P0 * chunk_keys, D) strips:
    one copy per chunk of plain slices (``index_select`` on an inner axis is far slower)."""
    b, h, _, d = t.shape
    layout, axes = window.layout, lay.axes
    x = t[:, :, layout.image_start : layout.image_stop].reshape(b * h, *window.grid, d)
    first = axes[0]
    shape = (lay.chunks, b * h, first.pad[0] + first.size + first.pad[1], *(ax.keys for ax in axes[1:]), d)
    buf = t.new_zeros(shape) if window.spec.exact else t.new_empty(shape)  # exact: zero padding
    rows = slice(first.pad[0], first.pad[0] + first.size)
    for c, origin in enumerate(_chunk_origins(axes[1:])):
        src, dst = [slice(None), slice(None)], [slice(None), rows]
        for ax, j in zip(axes[1:], origin, strict=True):
            lo = ax.starts[j] - ax.pad[0]  # grid coordinate of the chunk's first key
            a0, a1 = max(lo, 0), min(lo + ax.keys, ax.size)
            src.append(slice(a0, a1))
            dst.append(slice(a0 - lo, a1 - lo))
        buf[c][tuple(dst)] = x[tuple(src)]
    return buf.view(lay.chunks, b * h, -1, d)


def _query_tiles(t: torch.Tensor, window: Window, lay: _StripLayout) -> torch.Tensor:
    """Image queries of (B, H, L, D) as (chunks, B*H, tiles along the slowest axis, nq, D)."""
    b, h, _, d = t.shape
    layout, axes, nd = window.layout, lay.axes, len(lay.axes)
    x = t[:, :, layout.image_start : layout.image_stop].reshape(b * h, *window.grid, d)
    ragged = [0, 0, *(p for ax in reversed(axes) for p in (0, ax.tiles * ax.tile - ax.size))]
    if any(ragged):
        x = F.pad(x, ragged)
    x = x.reshape(b * h, *(n for ax in axes for n in (ax.tiles, ax.tile)), d)
    order = [1 + 2 * a for a in range(1, nd)] + [0, 1] + [2 + 2 * a for a in range(nd)] + [1 + 2 * nd]
    return x.permute(order).reshape(lay.chunks, b * h, axes[0].tiles, lay.nq, d)


def _untile(x: torch.Tensor, window: Window, lay: _StripLayout, b: int, h: int) -> torch.Tensor:
    """Inverse of ``_query_tiles`` for (chunks, B*H, tiles, nq, *rest): (B, H, N_image, *rest)."""
    axes, nd = lay.axes, len(lay.axes)
    rest = x.shape[4:]
    x = x.reshape(*(ax.tiles for ax in axes[1:]), b * h, axes[0].tiles, *(ax.tile for ax in axes), *rest)
    # now: chunk dims (nd-1), bh, T0, t0..t_{nd-1}, rest -> bh, (T_a, t_a) per axis, rest
    order = [nd - 1]
    for a in range(nd):
        order += [nd if a == 0 else a - 1, nd + 1 + a]
    order += list(range(2 * nd + 1, x.dim()))
    x = x.permute(order).reshape(b * h, *(ax.tiles * ax.tile for ax in axes), *rest)
    x = x[(slice(None), *(slice(0, ax.size) for ax in axes))]
    return x.reshape(b, h, window.layout.num_image, *rest)


def strip_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: Window, scale: float | None
) -> torch.Tensor:
    """Window attention of a 2D or 3D window on CPU; equal to the dense masked reference."""
    op = lse_attention_op()
    lay = _strip_layout(window, q.dtype)
    layout = window.layout
    b, h, _, d = q.shape
    dv = v.shape[-1]
    qt, ks, vs = _query_tiles(q, window, lay), _strips(k, window, lay), _strips(v, window, lay)
    out_t = q.new_empty(*qt.shape[:-1], dv)
    lse_t = q.new_empty(qt.shape[:-1], dtype=torch.float32)
    w, first = lay.chunk_keys, lay.axes[0]
    rows = ks.shape[2]
    for run in lay.runs:
        kc, vc = ks[run.chunk], vs[run.chunk]
        size = (b * h, run.count, first.keys * w)
        kv = [x.as_strided((*size, x.shape[-1]), (rows * x.shape[-1], run.key_step * w * x.shape[-1], x.shape[-1], 1),
                           x.storage_offset() + run.key_start * w * x.shape[-1]) for x in (kc, vc)]
        sl = slice(run.first, run.first + run.count)
        o, lse = op(qt[run.chunk, :, sl], kv[0], kv[1], attn_mask=run.mask, scale=scale)
        out_t[run.chunk, :, sl] = o
        lse_t[run.chunk, :, sl] = lse
    out = q.new_empty(b, h, layout.seq_len, dv)
    image = slice(layout.image_start, layout.image_stop)
    o_img = _untile(out_t, window, lay, b, h)
    spans = [(a, z) for a, z in ((0, layout.image_start), (layout.image_stop, layout.seq_len)) if z > a]
    if spans:
        # image queries also see every global key: merge that softmax in through the lse
        kg = torch.cat([k[:, :, a:z] for a, z in spans], dim=2)
        vg = torch.cat([v[:, :, a:z] for a, z in spans], dim=2)
        o_g, lse_g = op(q[:, :, image], kg, vg, scale=scale)
        lse_w = _untile(lse_t, window, lay, b, h)
        total = torch.logaddexp(lse_w, lse_g)
        o_img = o_img.float() * torch.exp(lse_w - total)[..., None] + o_g.float() * torch.exp(lse_g - total)[..., None]
        for a, z in spans:
            out[:, :, a:z] = F.scaled_dot_product_attention(q[:, :, a:z], k, v, scale=scale)
    out[:, :, image] = o_img
    return out


def strip_stats(window: Window) -> dict[str, float]:
    """Keys multiplied per query (including masked-out ones and padding) vs the window."""
    lay = _strip_layout(window, torch.float32)
    layout = window.layout
    nk = lay.axes[0].keys * lay.chunk_keys
    computed = sum(r.count for r in lay.runs) * lay.nq * nk
    computed += layout.num_global * layout.seq_len + layout.num_image * layout.num_global
    return {
        "computed_fraction": computed / layout.seq_len**2,
        "window_fraction": window.fraction,
        "sdpa_calls": len(lay.runs) + (2 if layout.num_global else 0),
    }
