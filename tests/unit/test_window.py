import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from ditfastattn_core.window import PRESETS, TokenLayout, WindowSpec

SHIFT_2D = WindowSpec(dims=2, extent=(0.25, 0.2), border="shift")
SHIFT_3D = WindowSpec(dims=3, extent=(0.5, 0.25, 0.25), border="shift")

LAYOUTS = [
    (WindowSpec(), TokenLayout.image_only((37,))),
    (WindowSpec(), TokenLayout.image_only((16, 20))),
    (WindowSpec(tile=(8,)), TokenLayout.image_only((100,))),
    (WindowSpec(dims=2, extent=(0.25, 0.2)), TokenLayout(seq_len=9 + 12 * 10, image_start=9, grid=(12, 10))),
    (WindowSpec(dims=2, extent=(0.25, 0.3), tile=(3, 4)), TokenLayout(seq_len=12 * 10 + 5, image_start=0, grid=(12, 10))),
    (WindowSpec(dims=3, extent=(0.5, 0.25, 0.25)), TokenLayout.image_only((4, 8, 6))),
    (WindowSpec(dims=3, extent=(0.5, 0.25, 0.25), tile=(1, 2, 3)), TokenLayout(seq_len=3 + 4 * 8 * 6, image_start=3, grid=(4, 8, 6))),
    (SHIFT_2D, TokenLayout.image_only((13, 9))),
    (SHIFT_2D, TokenLayout(seq_len=4 + 12 * 10 + 2, image_start=4, grid=(12, 10))),
    (SHIFT_3D, TokenLayout.image_only((3, 7, 5))),
    (WindowSpec(dims=3, extent=(1.0, 0.7, 0.25), border="shift"), TokenLayout.image_only((2, 3, 9))),  # kernel > axis
    (WindowSpec(extent=(0.2,), border="shift"), TokenLayout(seq_len=2 + 37, image_start=2, grid=(37,))),
]


@pytest.mark.parametrize("spec,layout", LAYOUTS)
def test_fraction_counts_the_keys_the_mask_allows(spec, layout):
    w = spec.bind(layout)
    assert w.pairs() == int(w.dense_mask().sum())
    assert 0 < w.fraction <= 1


def test_paper_band_half_width_is_n_over_8():
    w = WindowSpec.paper().bind(TokenLayout.image_only((64, 64)))
    assert w.radius == (512,)
    mask = w.dense_mask()
    row = mask[2000]
    assert row.sum() == 2 * 512 + 1
    assert row[2000 - 512] and row[2000 + 512] and not row[2000 - 513] and not row[2000 + 513]
    assert w.band_half_width == 512


def test_arrow_text_tokens_are_global():
    layout = TokenLayout(seq_len=6 + 64, image_start=6, grid=(8, 8))
    mask = WindowSpec().bind(layout).dense_mask()
    assert mask[:6].all(), "text queries see every key"
    assert mask[:, :6].all(), "every query sees the text keys"
    assert not mask[6:, 6:].all(), "image-to-image attention is windowed"
    assert WindowSpec().bind(layout).band_half_width is None


def test_image_first_layout_with_trailing_text():
    layout = TokenLayout(seq_len=64 + 5, image_start=0, grid=(8, 8))
    mask = WindowSpec().bind(layout).dense_mask()
    assert mask[64:].all() and mask[:, 64:].all()


@pytest.mark.parametrize("spec,layout", [s for s in LAYOUTS if not s[0].exact])
def test_block_aligned_window_gives_every_image_query_the_same_key_count(spec, layout):
    w = spec.bind(layout)
    mask = w.dense_mask()
    img = slice(layout.image_start, layout.image_stop)
    counts = mask[img, img].sum(1)
    assert (counts == counts[0]).all()
    # and it covers at least the exact window of the same radius
    exact = WindowSpec(dims=spec.dims, extent=spec.extent).bind(layout).dense_mask()
    assert (mask | ~exact).all()


def test_2d_window_is_a_rectangle_on_the_grid():
    layout = TokenLayout.image_only((10, 10))
    w = WindowSpec(dims=2, extent=(0.2, 0.3)).bind(layout)
    assert w.radius == (2, 3)
    mask = w.dense_mask().view(10, 10, 10, 10)
    seen = mask[5, 5]
    assert seen.sum() == 5 * 7
    assert seen[3:8, 2:9].all()


def test_2d_window_on_single_frame_video_grid():
    w = WindowSpec(dims=2, extent=(0.25, 0.25)).bind(TokenLayout.image_only((1, 8, 8)))
    assert w.grid == (8, 8)
    with pytest.raises(ValueError, match="cannot be laid"):
        WindowSpec(dims=2, extent=(0.25, 0.25)).bind(TokenLayout.image_only((3, 8, 8)))


@pytest.mark.parametrize(
    "kwargs",
    [dict(dims=4, extent=(0.1,) * 4), dict(extent=(0.0,)), dict(extent=(1.5,)), dict(extent=(0.1, 0.1)),
     dict(tile=(0,)), dict(dims=2, extent=(0.1, 0.1), tile=(4,))],
)
def test_bad_specs_are_refused(kwargs):
    with pytest.raises(ValueError):
        WindowSpec(**kwargs)


def test_layout_must_fit():
    with pytest.raises(ValueError, match="do not fit"):
        TokenLayout(seq_len=10, image_start=4, grid=(3, 3))


def test_spec_json_round_trip():
    for spec, _ in LAYOUTS:
        assert WindowSpec.from_json(spec.to_json()) == spec
    with pytest.raises(ValueError, match="unknown"):
        WindowSpec.from_json({"dims": 1, "extent": [0.1], "tile": [], "evil": 1})


def test_allowed_is_elementwise_on_scalars():
    w = WindowSpec().bind(TokenLayout.image_only((64,)))
    assert bool(w.allowed(torch.tensor(10), torch.tensor(18)))
    assert not bool(w.allowed(torch.tensor(10), torch.tensor(19)))


# --- the border-shifted (NATTEN) neighbourhood ------------------------------------------------


def natten_box(i: int, size: int, r: int) -> range:
    """NATTEN's neighbourhood on one axis, written out: ``2r + 1`` keys (at most the axis)
    centred on ``i``, shifted inwards at the borders."""
    k = min(2 * r + 1, size)
    start = min(max(i - k // 2, 0), size - k)
    return range(start, start + k)


SHIFT_GRIDS = [(SHIFT_2D, (13, 9)), (SHIFT_2D, (1, 8)), (SHIFT_3D, (3, 7, 5)),
               (WindowSpec(dims=3, extent=(1.0, 0.7, 0.25), border="shift"), (2, 3, 9)),
               (WindowSpec(extent=(0.2,), border="shift"), (37,))]


@pytest.mark.parametrize("spec,grid", SHIFT_GRIDS)
def test_shifted_window_is_nattens_neighbourhood(spec, grid):
    w = spec.bind(TokenLayout.image_only(grid))
    mask = w.dense_mask().view(*w.grid, *w.grid)
    for q in itertools.product(*(range(n) for n in w.grid)):
        boxes = [natten_box(i, n, r) for i, n, r in zip(q, w.grid, w.radius, strict=True)]
        want = torch.zeros(w.grid, dtype=torch.bool)
        want[tuple(slice(b.start, b.stop) for b in boxes)] = True
        assert torch.equal(mask[q], want), q


@pytest.mark.parametrize("spec,grid", SHIFT_GRIDS)
def test_every_query_of_a_shifted_window_sees_the_same_number_of_image_keys(spec, grid):
    layout = TokenLayout(seq_len=3 + math.prod(grid), image_start=3, grid=grid)
    w = spec.bind(layout)
    keys = math.prod(min(2 * r + 1, n) for r, n in zip(w.radius, w.grid, strict=True))
    img = slice(layout.image_start, layout.image_stop)
    assert (w.dense_mask()[img, img].sum(1) == keys).all()
    assert w.image_pairs() == layout.num_image * keys
    assert w.pairs() == int(w.dense_mask().sum())
    # it is the 1-token-tile block-aligned window, and covers the clamped window of its radius
    tiled = WindowSpec(dims=spec.dims, extent=spec.extent, tile=(1,) * spec.dims).bind(layout)
    assert torch.equal(w.dense_mask(), tiled.dense_mask())
    clamped = WindowSpec(dims=spec.dims, extent=spec.extent).bind(layout)
    assert (w.dense_mask() | ~clamped.dense_mask()).all()
    assert w.fraction > clamped.fraction or clamped.fraction == 1


def test_a_border_row_sees_the_rows_next_to_it_instead_of_fewer():
    w = SHIFT_2D.bind(TokenLayout.image_only((12, 10)))  # radius (3, 2)
    seen = w.dense_mask().view(12, 10, 12, 10)[0, 9]  # top-right corner
    assert seen.sum() == 7 * 5 and seen[0:7, 5:10].all()
    clamped = WindowSpec(dims=2, extent=(0.25, 0.2)).bind(w.layout).dense_mask().view(12, 10, 12, 10)[0, 9]
    assert clamped.sum() == 4 * 3
    assert w.band_half_width is None, "flash-attn's band is clamped"


def test_spec_json_of_a_shifted_window_round_trips_and_old_windows_write_what_they_wrote():
    spec = PRESETS["2D neighbourhood 1/8 (comfy-kitchen na2d)"]
    assert spec.to_json() == {"dims": 2, "extent": [0.125, 0.125], "tile": [], "border": "shift"}
    assert WindowSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    old = {"dims": 2, "extent": [0.125, 0.125], "tile": []}  # a plan written before the field
    assert WindowSpec.from_json(old) == WindowSpec(dims=2, extent=(0.125, 0.125)) == PRESETS["2D box 1/8"]
    assert WindowSpec.from_json(old).border == "clamp" and WindowSpec.from_json(old).to_json() == old
    assert WindowSpec.from_json({**old, "border": "clamp"}).to_json() == old


@pytest.mark.parametrize("border", ["wrap", "", "SHIFT", 1, None, True, ["shift"], {"shift": 1}])
def test_a_bad_border_in_json_is_refused(border):
    with pytest.raises(ValueError, match="border"):
        WindowSpec.from_json({"dims": 2, "extent": [0.1, 0.1], "tile": [], "border": border})


def test_a_shifted_window_takes_no_tiles():
    with pytest.raises(ValueError, match="tile or border"):
        WindowSpec(dims=2, extent=(0.1, 0.1), tile=(4, 4), border="shift")
    with pytest.raises(ValueError, match="tile or border"):
        WindowSpec.from_json({"dims": 2, "extent": [0.1, 0.1], "tile": [4, 4], "border": "shift"})


def test_presets_are_only_appended():
    """Saved workflows store preset names: the old ones keep their names, order and windows."""
    old = {
        "band 1/8 (paper)": WindowSpec(),
        "band 1/8, 256-token tiles (fast on CPU)": WindowSpec(tile=(256,)),
        "2D box 1/8": WindowSpec(dims=2, extent=(0.125, 0.125)),
        "2D box 1/8, 8x8 tiles": WindowSpec(dims=2, extent=(0.125, 0.125), tile=(8, 8)),
        "3D box 1/4 x 1/8 x 1/8 (video)": WindowSpec(dims=3, extent=(0.25, 0.125, 0.125)),
        "3D box, 1x8x8 tiles (video)": WindowSpec(dims=3, extent=(0.25, 0.125, 0.125), tile=(1, 8, 8)),
    }
    assert list(PRESETS.items())[: len(old)] == list(old.items())
    shifted = {name: spec for name, spec in PRESETS.items() if spec.shifted}
    assert [spec.dims for spec in shifted.values()] == [2, 3]
    assert all("comfy-kitchen" in name for name in shifted)


def test_shipped_plans_load_as_the_windows_they_were_written_with():
    from ditfastattn_core.plan import Plan

    plans = sorted((Path(__file__).resolve().parents[2] / "plans").glob("*.json"))
    assert plans
    for path in plans:
        text = path.read_text()
        plan = Plan.loads(text)
        assert plan.window.border == "clamp", path.name
        assert plan.window.to_json() == json.loads(text)["window"], path.name
