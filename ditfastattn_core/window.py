"""Which keys a query sees under window attention.

A ``WindowSpec`` is resolution independent (it lives in a plan); binding it to the token
layout of one attention call gives a ``Window`` with integer radii, whose ``allowed`` rule is
the single definition of the window used by every kernel, the dense reference and the cost
model alike.

Tokens outside the image span (text in joint attention, reference images) are *global*:
they see every key and every query sees them ("arrow" attention); only image-to-image
attention is windowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

MAX_DIMS = 3
BORDERS = ("clamp", "shift")
"""An exact window at the grid's borders: cut off, or shifted inwards (see ``WindowSpec``)."""


@dataclass(frozen=True)
class TokenLayout:
    """Where the image tokens sit in one attention call's sequence, and their grid."""

    seq_len: int
    image_start: int
    grid: tuple[int, ...]
    """Image token grid in raster order, slowest axis first: (H, W) or (T, H, W)."""

    def __post_init__(self) -> None:
        if not self.grid or any(int(s) < 1 for s in self.grid):
            raise ValueError(f"token grid must be positive sizes, got {self.grid}")
        if self.image_start < 0 or self.image_stop > self.seq_len:
            raise ValueError(
                f"image tokens [{self.image_start}, {self.image_stop}) do not fit a sequence "
                f"of {self.seq_len} tokens (grid {self.grid})"
            )

    @classmethod
    def image_only(cls, grid: tuple[int, ...]) -> TokenLayout:
        return cls(seq_len=math.prod(grid), image_start=0, grid=tuple(grid))

    @property
    def num_image(self) -> int:
        return math.prod(self.grid)

    @property
    def image_stop(self) -> int:
        return self.image_start + self.num_image

    @property
    def num_global(self) -> int:
        return self.seq_len - self.num_image


@dataclass(frozen=True)
class WindowSpec:
    """A window shape, independent of resolution.

    dims:    1 = the paper's band over raster-ordered image tokens; 2 = a rectangle on the
             image grid; 3 = a box on the video grid (frames, height, width).
    extent:  half-width per axis as a fraction of that axis' length (1D: of the image
             token count). The paper's default is 1/8 (``2 * N/8 + 1`` keys per query).
    tile:    () for the exact window. Otherwise a block-aligned window: the queries of one
             tile (per-axis sizes) all see the same box of whole tiles around it, shifted
             inwards at the borders so that every query sees the same number of keys. It is
             a different window, not an approximation of the exact one, and is much faster
             on kernels that work in blocks (CPU SDPA, FlexAttention).
    border:  what an exact window does at the grid's borders. "clamp" (the default, and all
             that plans without the field mean): the box is cut off, so border queries see
             fewer keys. "shift": NATTEN's neighbourhood (comfy-kitchen's na2d/na3d), the box
             keeps its ``2r + 1`` keys per axis (at most the axis) and is shifted inwards; it
             is the block-aligned window with 1-token tiles, so it needs no tiles of its own.
    """

    dims: int = 1
    extent: tuple[float, ...] = (0.125,)
    tile: tuple[int, ...] = ()
    border: str = "clamp"

    def __post_init__(self) -> None:
        if self.dims not in (1, 2, 3):
            raise ValueError(f"window dims must be 1, 2 or 3, got {self.dims!r}")
        if len(self.extent) != self.dims:
            raise ValueError(f"window extent needs {self.dims} value(s), got {self.extent!r}")
        for e in self.extent:
            if not isinstance(e, (int, float)) or isinstance(e, bool) or not 0 < e <= 1:
                raise ValueError(f"window extent must be fractions in (0, 1], got {self.extent!r}")
        if self.tile and len(self.tile) != self.dims:
            raise ValueError(f"window tile needs {self.dims} size(s) or none, got {self.tile!r}")
        for t in self.tile:
            if not isinstance(t, int) or isinstance(t, bool) or not 1 <= t <= 65536:
                raise ValueError(f"window tile sizes must be integers in [1, 65536], got {self.tile!r}")
        if self.border not in BORDERS:
            raise ValueError(f"window border must be one of {', '.join(BORDERS)}, got {self.border!r}")
        if self.tile and self.border != "clamp":
            raise ValueError("a block-aligned window is already shifted inwards at the borders: give tile or border, not both")

    @classmethod
    def paper(cls) -> WindowSpec:
        """The paper's window: a 1D band of half-width N_img / 8."""
        return cls()

    @property
    def exact(self) -> bool:
        return len(self.tile) == 0

    @property
    def shifted(self) -> bool:
        """An exact window that keeps its size at the borders (NATTEN's neighbourhood)."""
        return self.border == "shift"

    def bind(self, layout: TokenLayout) -> Window:
        """Resolve the window for one call's token layout."""
        grid = _fold_grid(layout.grid, self.dims)
        radius = tuple(max(1, int(size * e)) for size, e in zip(grid, self.extent, strict=True))
        return Window(spec=self, layout=layout, grid=grid, radius=radius)

    def to_json(self) -> dict[str, Any]:
        """The plan's ``window`` object; ``border`` only when not the default, so a clamped
        window writes exactly what plans wrote before the field existed."""
        data: dict[str, Any] = {"dims": self.dims, "extent": list(self.extent), "tile": list(self.tile)}
        if self.border != "clamp":
            data["border"] = self.border
        return data

    @classmethod
    def from_json(cls, data: Any) -> WindowSpec:
        if not isinstance(data, dict):
            raise ValueError("window must be an object with dims, extent and tile")
        unknown = set(data) - {"dims", "extent", "tile", "border"}
        if unknown:
            raise ValueError(f"window has unknown field(s): {sorted(unknown)}")
        dims = data.get("dims")
        extent = data.get("extent")
        tile = data.get("tile", [])
        border = data.get("border", "clamp")
        if not isinstance(dims, int) or isinstance(dims, bool):
            raise ValueError("window.dims must be an integer")
        if not isinstance(extent, list) or not isinstance(tile, list):
            raise ValueError("window.extent and window.tile must be lists")
        if not isinstance(border, str):
            raise ValueError(f"window.border must be one of {', '.join(BORDERS)}")
        return cls(dims=dims, extent=tuple(extent), tile=tuple(tile), border=border)


PRESETS: dict[str, WindowSpec] = {
    "band 1/8 (paper)": WindowSpec(),
    "band 1/8, 256-token tiles (fast on CPU)": WindowSpec(tile=(256,)),
    "2D box 1/8": WindowSpec(dims=2, extent=(0.125, 0.125)),
    "2D box 1/8, 8x8 tiles": WindowSpec(dims=2, extent=(0.125, 0.125), tile=(8, 8)),
    "3D box 1/4 x 1/8 x 1/8 (video)": WindowSpec(dims=3, extent=(0.25, 0.125, 0.125)),
    "3D box, 1x8x8 tiles (video)": WindowSpec(dims=3, extent=(0.25, 0.125, 0.125), tile=(1, 8, 8)),
    "2D neighbourhood 1/8 (comfy-kitchen na2d)": WindowSpec(dims=2, extent=(0.125, 0.125), border="shift"),
    "3D neighbourhood 1/4 x 1/8 x 1/8 (comfy-kitchen na3d)": WindowSpec(
        dims=3, extent=(0.25, 0.125, 0.125), border="shift"),
    "2D box 1/4 (the paper band's cost)": WindowSpec(dims=2, extent=(0.25, 0.25)),
    "3D box 1/2 x 1/4 x 1/4 (the paper band's cost)": WindowSpec(dims=3, extent=(0.5, 0.25, 0.25)),
}
"""The windows Calibrate offers by name; the kernel benchmark times exactly these. Saved
workflows store the names: append new ones, never rename. The last two keep about a quarter of
the keys at any resolution, as the paper's band does ((2 * 1/4)^2 and 1 * (2 * 1/4)^2 of the grid),
so that the window study compares shapes at equal cost."""

FAMILY_DEFAULT = "default for the model's family"
"""Calibrate's window choice that stands for the preset the window study found best for the
model's kind of token grid (``FAMILY_WINDOWS``; a family may name its own): the plan stores the
window it stood for."""

FAMILY_WINDOWS: dict[int, str] = {
    2: "2D box 1/4 (the paper band's cost)",
    3: "3D box 1/2 x 1/4 x 1/4 (the paper band's cost)",
}
"""The preset per token grid (2: image families, 3: video families), from the window study on
the 256-token demo models (docs/window_study.md)."""


def _fold_grid(grid: tuple[int, ...], dims: int) -> tuple[int, ...]:
    """The grid the window works on: 1D flattens; a 2D window on a video grid needs T == 1."""
    if dims == 1:
        return (math.prod(grid),)
    while len(grid) > dims and grid[0] == 1:
        grid = grid[1:]
    if len(grid) < dims:
        grid = (1,) * (dims - len(grid)) + tuple(grid)
    if len(grid) != dims:
        raise ValueError(f"a {dims}D window cannot be laid on a token grid of shape {grid}")
    return tuple(grid)


@dataclass(frozen=True)
class Window:
    """A WindowSpec bound to one token layout: integer radii on a concrete grid."""

    spec: WindowSpec
    layout: TokenLayout
    grid: tuple[int, ...]
    radius: tuple[int, ...]

    # --- the rule -------------------------------------------------------------------------
    def axis_box(self, axis: int, coord: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inclusive [lo, hi] of visible key coordinates on one axis, for query coords."""
        size, r = self.grid[axis], self.radius[axis]
        if self.spec.exact and not self.spec.shifted:
            return (coord - r).clamp(min=0), (coord + r).clamp(max=size - 1)
        t = self.spec.tile[axis] if self.spec.tile else 1  # border-shifted: 1-token tiles
        n_tiles = -(-r // t)
        win = min((2 * n_tiles + 1) * t, size)
        start = ((coord // t - n_tiles) * t).clamp(min=0, max=size - win)
        return start, start + (win - 1)

    def coords(self, image_index: torch.Tensor) -> list[torch.Tensor]:
        out = []
        rem = image_index
        for size in reversed(self.grid):
            out.append(rem % size)
            rem = rem // size
        return out[::-1]

    def allowed(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Boolean: may sequence position ``q`` see ``k``? Broadcasts; elementwise ops only,
        so it also serves as a FlexAttention mask_mod."""
        start, n_img = self.layout.image_start, self.layout.num_image
        qi, ki = q - start, k - start
        q_img = (qi >= 0) & (qi < n_img)
        k_img = (ki >= 0) & (ki < n_img)
        qc = self.coords(qi.clamp(min=0, max=n_img - 1))
        kc = self.coords(ki.clamp(min=0, max=n_img - 1))
        inside = None
        for axis in range(len(self.grid)):
            lo, hi = self.axis_box(axis, qc[axis])
            ok = (kc[axis] >= lo) & (kc[axis] <= hi)
            inside = ok if inside is None else inside & ok
        return ~q_img | ~k_img | inside

    def dense_mask(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The (L, L) boolean mask. Quadratic memory: for tests and small sizes only."""
        idx = torch.arange(self.layout.seq_len, device=device)
        return self.allowed(idx[:, None], idx[None, :])

    # --- what it costs ----------------------------------------------------------------------
    def image_pairs(self) -> int:
        """Number of (image query, image key) pairs the window keeps."""
        total = 1
        for axis, size in enumerate(self.grid):
            c = torch.arange(size)
            lo, hi = self.axis_box(axis, c)
            total *= int((hi - lo + 1).sum())
        return total

    def pairs(self) -> int:
        """(query, key) pairs computed by window attention over the whole sequence."""
        n, g = self.layout.num_image, self.layout.num_global
        return self.image_pairs() + g * self.layout.seq_len + n * g

    @property
    def fraction(self) -> float:
        """Attention FLOPs of window attention relative to dense attention (QK^T and PV)."""
        return self.pairs() / self.layout.seq_len**2

    @property
    def band_half_width(self) -> int | None:
        """Half-width if this is an exact 1D band over a pure image sequence (what
        flash-attn's ``window_size=(w, w)`` expresses), else None."""
        if self.spec.dims == 1 and self.spec.exact and not self.spec.shifted and self.layout.num_global == 0:
            return self.radius[0]
        return None
