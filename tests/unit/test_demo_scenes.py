"""The 256-token demo models' data (demo_model/scenes.py) and their latent mapping (torch only;
the digits and the committed classifiers need scikit-learn)."""

import pytest
import torch

from demo_model import scenes
from demo_model.variants import VARIANTS


def test_canvases_have_fourfold_rotational_symmetry_and_the_offset_moves_the_digit():
    digits = torch.rand(3, 8, 8)
    canvases = scenes.compose_canvas(digits, torch.tensor([[0, 0], [8, 32], [32, 16]]))
    assert canvases.shape == (3, 1, 128, 128)
    assert scenes.rotation_error(canvases).max().item() == 0.0
    moved = scenes.compose_canvas(digits[:1], torch.tensor([[8, 0]]))
    assert not torch.equal(canvases[0], moved[0])
    # the digit sits in the top-left quadrant at its offset, its rotations in the others
    torch.testing.assert_close(canvases[1, 0, 8:40, 32:64].sum(), canvases[1, 0, :64, :64].sum())


def test_rotation_error_sees_a_broken_copy():
    canvas = scenes.compose_canvas(torch.rand(1, 8, 8), torch.tensor([[16, 16]]))
    canvas[..., 64:, 64:] = 0.0  # one of the four copies missing
    assert scenes.rotation_error(canvas).item() > 0.01


def test_clips_move_the_digit_by_the_class_velocity():
    digits = torch.rand(10, 8, 8)
    labels = torch.arange(10)
    clips = scenes.compose_clip(digits, labels, torch.zeros(10, 2, dtype=torch.long))
    assert clips.shape == (10, scenes.FRAMES, 1, 64, 64)
    v = scenes.velocity(labels)
    assert len({tuple(x) for x in v.tolist()}) == 10  # every class its own direction
    assert (v.abs().amax(dim=1) == scenes.SPEED).all()
    for i in range(10):
        for t in range(scenes.FRAMES - 1):
            shifted = torch.roll(clips[i, t], tuple(v[i].tolist()), dims=(-2, -1))
            torch.testing.assert_close(shifted, clips[i, t + 1])
    assert scenes.motion_error(clips).max().item() == 0.0
    frozen = clips[:, :1].expand_as(clips).clone()
    frozen[:, 1:] = torch.roll(frozen[:, 1:], (20, 20), dims=(-2, -1))  # a jump no motion explains
    assert scenes.motion_error(frozen).min().item() > 0.01


def test_latents_are_the_frames_in_4x4_blocks():
    images = torch.rand(2, 1, 128, 128)
    torch.testing.assert_close(scenes.model_latent_to_image(scenes.image_to_model_latent(images)), images)
    clips = torch.rand(2, 4, 1, 64, 64)
    latents = scenes.image_to_model_latent(clips)
    assert latents.shape == (2, 16, 4, 16, 16)  # Wan's (B, C, T, H, W)
    torch.testing.assert_close(scenes.model_latent_to_image(latents), clips)
    assert latents[1, 6, 2, 3, 5].item() == pytest.approx(clips[1, 2, 0, 4 * 3 + 1, 4 * 5 + 2].item() * 2 - 1)


@pytest.mark.parametrize("name", ["image", "video"])
def test_committed_classifiers_are_accurate_on_held_out_real_samples(name):
    pytest.importorskip("sklearn")
    from demo_model.data import load_digits_split

    v = VARIANTS[name]
    _, _, test_x, test_y = load_digits_split()
    samples, labels = v.real_set(test_x, test_y, seed=1)
    accuracy = (v.load_classifier().predict(samples) == labels).float().mean().item()
    assert accuracy >= 0.97
