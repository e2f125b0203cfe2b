"""Window attention as a few batched SDPA calls over gathered key blocks; runs on any device.

The image queries are cut into blocks (tiles of the token grid). Each block attends to the
bounding box of the keys its queries may see plus the global keys, with a boolean mask only
where the box holds keys the window excludes (exact windows). Blocks with the same shape and
the same mask go into one SDPA call, so a block-aligned window is mask-free and costs close to
its FLOPs fraction, and an exact band costs one call for all interior blocks.

A wide 1D band on CPU takes another route (``_split_band_attention``): masked or per-tile
blocks would either be too small for the CPU flash kernel to reuse its key blocks from cache
or waste a masked triangle as wide as the block. Each query chunk is instead split into parts
that need no mask (the keys every query of the chunk sees, the global keys, and two causal
triangles or each tile's own side ranges), merged exactly through their log-sum-exp.

Both layouts depend only on the window and the sequence geometry; they are built once per
geometry (and device) and cached, so an attention call only runs them.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..window import Window
from .strips import lse_attention_op, strip_attention, strip_stats, strips_usable

EXACT_CHUNK_1D = 256
"""Query block of the exact 1D band: 256 keeps SDPA efficient while the masked share
of each block stays small (measured on a 2-core CPU; see bench/kernels.py)."""

SPLIT_CHUNK_1D = 768
"""Query chunk of the split band: from 768 queries on, the CPU flash kernel works in query
blocks of 256 and reuses each key block across them (below, blocks of 64 and 32)."""

GATHER_BUDGET_BYTES = 256 * 2**20
"""Upper bound on the gathered K (and V) of one SDPA call; larger groups are split."""


@dataclass(frozen=True)
class _Slab:
    """One query block whose queries and keys are both contiguous ranges: runs on views."""

    q_start: int
    nq: int
    k_start: int
    nk: int
    mask: torch.Tensor | None


@dataclass(frozen=True)
class _Group:
    """Query blocks of equal shape and mask, gathered and run as one batched SDPA call."""

    q_idx: torch.Tensor  # (count * nq,) sequence positions, block after block
    k_idx: torch.Tensor  # (count * nk,)
    count: int
    nq: int
    nk: int
    mask: torch.Tensor | None  # (nq, nk), shared by every block of the group


@dataclass(frozen=True)
class _BlockLayout:
    slabs: tuple[_Slab, ...]
    groups: tuple[_Group, ...]
    global_ranges: tuple[tuple[int, int], ...]


def _query_tile(window: Window) -> tuple[int, ...]:
    if not window.spec.exact:
        return tuple(min(t, s) for t, s in zip(window.spec.tile, window.grid, strict=True))
    if len(window.grid) == 1:
        return (min(EXACT_CHUNK_1D, window.grid[0]),)
    # Exact boxes: a query tile about as large as the radius keeps the box overhead per axis
    # near (3r) / (2r + 1) while keeping blocks big enough for SDPA.
    return tuple(max(1, min(s, r)) for s, r in zip(window.grid, window.radius, strict=True))


def _raster(ranges: list[range], grid: tuple[int, ...]) -> torch.Tensor:
    """Raster indices of the box that is the product of per-axis coordinate ranges."""
    idx = torch.zeros((), dtype=torch.long)
    for r, size in zip(ranges, grid, strict=True):
        idx = idx[..., None] * size + torch.tensor(r, dtype=torch.long)
    return idx.reshape(-1)


def _contiguous_start(idx: torch.Tensor) -> int | None:
    first = int(idx[0])
    if torch.equal(idx, torch.arange(first, first + idx.numel())):
        return first
    return None


def _global_ranges(window: Window) -> tuple[tuple[int, int], ...]:
    """The non-empty spans of global (text, reference) tokens before and after the image."""
    layout = window.layout
    spans = ((0, layout.image_start), (layout.image_stop, layout.seq_len))
    return tuple((a, z) for a, z in spans if z > a)


@functools.lru_cache(maxsize=32)
def _build_layout(window: Window, device: str) -> _BlockLayout:
    layout = window.layout
    start = layout.image_start
    global_idx = torch.cat(
        [torch.arange(0, start), torch.arange(layout.image_stop, layout.seq_len)]
    )
    tile = _query_tile(window)
    slabs: list[_Slab] = []
    buckets: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    masks: dict[tuple, torch.Tensor | None] = {}
    origins = [range(0, size, t) for size, t in zip(window.grid, tile, strict=True)]
    for origin in itertools.product(*origins):
        q_ranges, k_ranges = [], []
        for axis, (o, t, size) in enumerate(zip(origin, tile, window.grid, strict=True)):
            q_ranges.append(range(o, min(o + t, size)))
            lo, _ = window.axis_box(axis, torch.tensor(o))
            _, hi = window.axis_box(axis, torch.tensor(min(o + t, size) - 1))
            k_ranges.append(range(int(lo), int(hi) + 1))
        q_idx = _raster(q_ranges, window.grid) + start
        k_idx = torch.cat([global_idx, _raster(k_ranges, window.grid) + start])
        mask = window.allowed(q_idx[:, None], k_idx[None, :])
        mask = None if bool(mask.all()) else mask
        q0, k0 = _contiguous_start(q_idx), _contiguous_start(k_idx)
        if q0 is not None and k0 is not None:
            dev_mask = None if mask is None else mask.to(device)
            slabs.append(_Slab(q0, q_idx.numel(), k0, k_idx.numel(), dev_mask))
            continue
        key = (q_idx.numel(), k_idx.numel(), None if mask is None else mask.numpy().tobytes())
        buckets.setdefault(key, []).append((q_idx, k_idx))
        masks[key] = mask

    groups = []
    for key, members in buckets.items():
        mask = masks[key]
        groups.append(
            _Group(
                q_idx=torch.cat([m[0] for m in members]).to(device),
                k_idx=torch.cat([m[1] for m in members]).to(device),
                count=len(members),
                nq=key[0],
                nk=key[1],
                mask=None if mask is None else mask.to(device),
            )
        )
    return _BlockLayout(
        slabs=tuple(slabs), groups=tuple(groups), global_ranges=_global_ranges(window)
    )


@dataclass(frozen=True)
class _Part:
    """Keys [k0, k1) seen by rows [r0, r1) of a query chunk. ``causal``: row j sees key c
    iff c <= j (top-left aligned); ``reversed``: iff c >= j, run as causal on reversed rows
    and keys."""

    r0: int
    r1: int
    k0: int
    k1: int
    causal: bool = False
    reversed: bool = False

    @property
    def pairs(self) -> int:
        nq, nk = self.r1 - self.r0, self.k1 - self.k0
        return nk * (nk + 1) // 2 + (nq - nk) * nk if self.causal or self.reversed else nq * nk


@functools.lru_cache(maxsize=32)
def _tile_keys(window: Window) -> int:
    """Image keys each query of a block-aligned 1D window sees."""
    lo, hi = window.axis_box(0, torch.tensor(0))
    return int(hi - lo) + 1


def _split_chunk(window: Window, device_type: str) -> int | None:
    """Query rows per chunk of the split band for this call, or None to use masked blocks."""
    if window.spec.dims != 1 or window.spec.shifted or device_type != "cpu" or lse_attention_op() is None:
        return None  # the split parts below assume a band cut off at the borders, or tiles
    if window.spec.exact:
        # a chunk wider than the radius would leave no key that all its queries see
        return SPLIT_CHUNK_1D if window.radius[0] >= SPLIT_CHUNK_1D else None
    # A tile's own slab is already mask-free; it is only slow when its keys outgrow the cache
    # (measured: split wins at 4352 keys a tile, loses at 1280 and below).
    if _tile_keys(window) <= 2 * SPLIT_CHUNK_1D:
        return None
    tile = window.spec.tile[0]
    tiles = min(SPLIT_CHUNK_1D // tile, -(-window.radius[0] // tile) + 1)
    return tiles * tile if tiles >= 2 else None


def _check_chunk(window: Window, chunk: int) -> None:
    if window.spec.shifted:
        raise ValueError("the split band cuts a band off at the borders; a border-shifted one takes masked blocks")
    if window.spec.exact:
        if not 1 <= chunk <= window.radius[0]:
            raise ValueError(f"split-band chunk {chunk} must be in [1, radius {window.radius[0]}]")
        return
    tile = window.spec.tile[0]
    if chunk < tile or chunk % tile or chunk - tile >= _tile_keys(window):
        raise ValueError(f"split-band chunk {chunk} must be whole tiles of {tile}, fewer than the window")


@functools.lru_cache(maxsize=32)
def _split_band_parts(window: Window, chunk: int) -> tuple[tuple[int, int, tuple[_Part, ...]], ...]:
    """Per query chunk: (q0, q1, parts), positions in the call's sequence."""
    _check_chunk(window, chunk)
    layout, r = window.layout, window.radius[0]
    start, n = layout.image_start, layout.num_image
    chunks = []
    for a in range(0, n, chunk):
        z = min(a + chunk, n)
        parts = [_Part(0, z - a, k0, k1) for k0, k1 in _global_ranges(window)]
        if window.spec.exact:
            # Query a + j (j < z - a <= r) sees image keys [a + j - r, a + j + r]. Key a - r + c
            # is seen iff c >= j (an upper triangle), keys [z - r, a + r) by every query, key
            # a + r + c iff c <= j (causal). Clipping at the borders only drops keys, so the
            # triangles stay top-left aligned.
            spans = (
                (max(0, a - r), max(0, z - r), False, True),
                (max(0, z - r), min(n, a + r), False, False),
                (min(n, a + r), min(n, z + r), True, False),
            )
            parts += [_Part(0, z - a, start + k0, start + k1, c, rv) for k0, k1, c, rv in spans if k1 > k0]
        else:
            # Every query of a tile sees the same key range; the chunk's tiles share the
            # middle of it, and each tile adds its own few tiles on either side.
            tile = window.spec.tile[0]
            rows = [(t0, min(t0 + tile, z)) for t0 in range(a, z, tile)]
            boxes = [window.axis_box(0, torch.tensor(t0)) for t0, _ in rows]
            ranges = [(int(lo), int(hi) + 1) for lo, hi in boxes]
            mid0, mid1 = max(lo for lo, _ in ranges), min(hi for _, hi in ranges)
            parts.append(_Part(0, z - a, start + mid0, start + mid1))
            for (t0, t1), (lo, hi) in zip(rows, ranges, strict=True):
                for k0, k1 in ((lo, mid0), (mid1, hi)):
                    if k1 > k0:
                        parts.append(_Part(t0 - a, t1 - a, start + k0, start + k1))
        chunks.append((start + a, start + z, tuple(parts)))
    return tuple(chunks)


def _split_band_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: Window,
    scale: float | None,
    chunk: int,
) -> torch.Tensor:
    chunks = _split_band_parts(window, chunk)
    op = lse_attention_op()
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
    for a, z in _global_ranges(window):
        out[:, :, a:z] = F.scaled_dot_product_attention(q[:, :, a:z], k, v, scale=scale)
    for q0, q1, parts in chunks:
        # Online merge of the parts' softmaxes through their log-sum-exp, in fp32.
        acc = q.new_zeros(*q.shape[:2], q1 - q0, v.shape[-1], dtype=torch.float32)
        lse_acc = q.new_full((*q.shape[:2], q1 - q0), float("-inf"), dtype=torch.float32)
        for p in parts:
            qc = q[:, :, q0 + p.r0 : q0 + p.r1]
            kc, vc = k[:, :, p.k0 : p.k1], v[:, :, p.k0 : p.k1]
            if p.reversed:
                o, lse = op(qc.flip(2), kc.flip(2), vc.flip(2), is_causal=True, scale=scale)
                o, lse = o.flip(2), lse.flip(2)
            else:
                o, lse = op(qc, kc, vc, is_causal=p.causal, scale=scale)
            old = lse_acc[:, :, p.r0 : p.r1]
            new = torch.logaddexp(old, lse)
            rows = acc[:, :, p.r0 : p.r1]
            rows.mul_(torch.exp(old - new).unsqueeze(-1))
            rows.addcmul_(o.float(), torch.exp(lse - new).unsqueeze(-1))
            old.copy_(new)
        out[:, :, q0:q1] = acc
    return out


def blocked_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: Window, scale: float | None = None
) -> torch.Tensor:
    """Window attention on (B, H, L, D) tensors; equal to the dense masked reference."""
    b, h, seq, d = q.shape
    if seq != window.layout.seq_len or k.shape[2] != seq:
        raise ValueError(
            f"sequence of {seq} tokens does not match the window's {window.layout.seq_len}"
        )
    chunk = _split_chunk(window, q.device.type)
    if chunk is not None:
        return _split_band_attention(q, k, v, window, scale, chunk)
    if strips_usable(window, q.device.type):
        return strip_attention(q, k, v, window, scale)
    plan = _build_layout(window, str(q.device))
    dv = v.shape[-1]
    out = q.new_empty(b, h, seq, dv)
    for a, z in plan.global_ranges:
        out[:, :, a:z] = F.scaled_dot_product_attention(q[:, :, a:z], k, v, scale=scale)
    for s in plan.slabs:
        out[:, :, s.q_start : s.q_start + s.nq] = F.scaled_dot_product_attention(
            q[:, :, s.q_start : s.q_start + s.nq],
            k[:, :, s.k_start : s.k_start + s.nk],
            v[:, :, s.k_start : s.k_start + s.nk],
            attn_mask=s.mask,
            scale=scale,
        )
    row_bytes = b * h * (d + dv) * q.element_size()
    for grp in plan.groups:
        per_call = max(1, GATHER_BUDGET_BYTES // max(1, grp.nk * row_bytes))
        for g0 in range(0, grp.count, per_call):
            g = min(per_call, grp.count - g0)
            q_idx = grp.q_idx[g0 * grp.nq : (g0 + g) * grp.nq]
            k_idx = grp.k_idx[g0 * grp.nk : (g0 + g) * grp.nk]
            qb = q.index_select(2, q_idx).view(b, h * g, grp.nq, d)
            kb = k.index_select(2, k_idx).view(b, h * g, grp.nk, d)
            vb = v.index_select(2, k_idx).view(b, h * g, grp.nk, dv)
            ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=grp.mask, scale=scale)
            out.index_copy_(2, q_idx, ob.view(b, h, g * grp.nq, dv))
    return out


def block_layout_stats(window: Window) -> dict[str, float]:
    """Keys actually multiplied per query (incl. masked-out ones) vs the window's FLOPs, on CPU.

    Causal triangles count the pairs asked of the kernel; it rounds them up to its own key
    blocks (512 keys on CPU)."""
    chunk = _split_chunk(window, "cpu")
    if chunk is not None:
        layout = window.layout
        parts = [p for _, _, ps in _split_band_parts(window, chunk) for p in ps]
        computed = sum(p.pairs for p in parts) + layout.num_global * layout.seq_len
        return {
            "computed_fraction": computed / layout.seq_len**2,
            "window_fraction": window.fraction,
            "sdpa_calls": len(parts) + len(_global_ranges(window)),
        }
    if strips_usable(window, "cpu"):
        return strip_stats(window)
    plan = _build_layout(window, "cpu")
    computed = sum(s.nq * s.nk for s in plan.slabs)
    computed += sum(g.count * g.nq * g.nk for g in plan.groups)
    computed += sum((z - a) * window.layout.seq_len for a, z in plan.global_ranges)
    return {
        "computed_fraction": computed / window.layout.seq_len**2,
        "window_fraction": window.fraction,
        "sdpa_calls": len(plan.slabs) + len(plan.groups) + len(plan.global_ranges),
    }
