import pytest
import torch

from ditfastattn_core.window import TokenLayout, WindowSpec

LAYOUTS = [
    (WindowSpec(), TokenLayout.image_only((37,))),
    (WindowSpec(), TokenLayout.image_only((16, 20))),
    (WindowSpec(tile=(8,)), TokenLayout.image_only((100,))),
    (WindowSpec(dims=2, extent=(0.25, 0.2)), TokenLayout(seq_len=9 + 12 * 10, image_start=9, grid=(12, 10))),
    (WindowSpec(dims=2, extent=(0.25, 0.3), tile=(3, 4)), TokenLayout(seq_len=12 * 10 + 5, image_start=0, grid=(12, 10))),
    (WindowSpec(dims=3, extent=(0.5, 0.25, 0.25)), TokenLayout.image_only((4, 8, 6))),
    (WindowSpec(dims=3, extent=(0.5, 0.25, 0.25), tile=(1, 2, 3)), TokenLayout(seq_len=3 + 4 * 8 * 6, image_start=3, grid=(4, 8, 6))),
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
