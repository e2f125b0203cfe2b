"""Window attention as a few batched SDPA calls over gathered key blocks; runs on any device.

The image queries are cut into blocks (tiles of the token grid). Each block attends to the
bounding box of the keys its queries may see plus the global keys, with a boolean mask only
where the box holds keys the window excludes (exact windows). Blocks with the same shape and
the same mask go into one SDPA call, so a block-aligned window is mask-free and costs close to
its FLOPs fraction, and an exact band costs one call for all interior blocks.

The block layout depends only on the window and the sequence geometry; it is built once per
geometry and device and cached.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..window import Window

EXACT_CHUNK_1D = 256
"""Query block of the exact 1D band: 256 keeps SDPA efficient while the masked share
of each block stays small (measured on a 2-core CPU; see bench/kernels.py)."""

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
    global_ranges = tuple(
        (a, b) for a, b in ((0, start), (layout.image_stop, layout.seq_len)) if b > a
    )
    return _BlockLayout(slabs=tuple(slabs), groups=tuple(groups), global_ranges=global_ranges)


def blocked_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: Window, scale: float | None = None
) -> torch.Tensor:
    """Window attention on (B, H, L, D) tensors; equal to the dense masked reference."""
    b, h, seq, d = q.shape
    if seq != window.layout.seq_len or k.shape[2] != seq:
        raise ValueError(
            f"sequence of {seq} tokens does not match the window's {window.layout.seq_len}"
        )
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
    """Keys actually multiplied per query (incl. masked-out ones) vs the window's FLOPs."""
    plan = _build_layout(window, "cpu")
    computed = sum(s.nq * s.nk for s in plan.slabs)
    computed += sum(g.count * g.nq * g.nk for g in plan.groups)
    computed += sum((z - a) * window.layout.seq_len for a, z in plan.global_ranges)
    return {
        "computed_fraction": computed / window.layout.seq_len**2,
        "window_fraction": window.fraction,
        "sdpa_calls": len(plan.slabs) + len(plan.groups) + len(plan.global_ranges),
    }
