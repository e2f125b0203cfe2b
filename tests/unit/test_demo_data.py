"""The demo model's data and latent mapping (torch only; the digits need scikit-learn)."""

import pytest
import torch

from demo_model.data import compose, image_to_model_latent, model_latent_to_image, symmetry_error


def test_composed_images_are_mirror_symmetric_and_shifts_move_the_digit():
    digits = torch.rand(3, 8, 8)
    images = compose(digits, torch.tensor([[0, 0], [1, -1], [-1, 1]]))
    assert images.shape == (3, 1, 64, 64)
    assert symmetry_error(images).max().item() == 0.0
    assert not torch.equal(images[0], compose(digits[:1], torch.tensor([[1, 0]]))[0])


def test_symmetry_error_sees_a_broken_mirror():
    images = compose(torch.rand(1, 8, 8))
    images[..., :8, :8] = 1.0 - images[..., :8, :8]
    assert symmetry_error(images).item() > 0.005  # 1/64 of the image off its mirrors


def test_latent_is_the_image_in_4x4_blocks():
    images = torch.rand(2, 1, 64, 64)
    latents = image_to_model_latent(images)
    assert latents.shape == (2, 16, 16, 16)
    assert latents.min() >= -1 and latents.max() <= 1
    torch.testing.assert_close(model_latent_to_image(latents), images)
    # channel c of latent cell (i, j) is pixel (4i + c // 4, 4j + c % 4)
    assert latents[1, 6, 3, 5].item() == pytest.approx(images[1, 0, 4 * 3 + 1, 4 * 5 + 2].item() * 2 - 1)


def test_held_out_split_is_fixed_and_disjoint():
    pytest.importorskip("sklearn")
    from demo_model.data import load_digits_split

    train_x, train_y, test_x, test_y = load_digits_split()
    again = load_digits_split()
    assert torch.equal(test_x, again[2]) and torch.equal(train_y, again[1])
    assert len(train_y) + len(test_y) == 1797 and len(test_y) == 359
    flat_train = {tuple(x.flatten().tolist()) for x in train_x}
    overlap = sum(tuple(x.flatten().tolist()) in flat_train for x in test_x)
    assert overlap < 5  # scikit-learn's set has a few exact duplicates, nothing more


def test_committed_classifier_is_accurate_on_held_out_real_images():
    pytest.importorskip("sklearn")
    from demo_model import CLASSIFIER_FILE
    from demo_model.classifier import load_classifier
    from demo_model.data import every_shift, load_digits_split

    _, _, test_x, test_y = load_digits_split()
    images, labels = every_shift(test_x, test_y)
    accuracy = (load_classifier(CLASSIFIER_FILE).predict(images) == labels).float().mean().item()
    assert accuracy >= 0.98
