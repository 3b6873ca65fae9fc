"""Self-CutPaste pseudo anomalies: inside the foreground (the object on a dark or light background), labels consistent
with masks, images changed only there."""

import pytest
import torch

from anomalib_robust.models.patch_guard.pseudo_anomaly import LEVELS, PseudoAnomalyGenerator


def _object_images(batch: int = 6, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Textured discs on a black background, and their foreground (the discs)."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    foreground = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2).expand(batch, size, size)
    texture = torch.rand(batch, 3, size, size)
    return texture * foreground[:, None], foreground.clone()


def test_masks_inside_foreground_and_patch_labels_match_masks() -> None:
    images, foreground = _object_images()
    pseudo = PseudoAnomalyGenerator(patch_size=4, seed=0)(images, foreground)
    assert pseudo.images.shape == images.shape and pseudo.masks.shape == (6, 32, 32)
    assert pseudo.patch_labels.shape == (6, 64)
    assert not (pseudo.masks.bool() & ~foreground).any()
    assert (pseudo.masks.flatten(1).sum(dim=1) > 0).all()
    for b in range(6):
        for index in range(64):
            row, column = divmod(index, 8)
            patch = pseudo.masks[b, 4 * row : 4 * row + 4, 4 * column : 4 * column + 4]
            assert pseudo.patch_labels[b, index] == float(patch.any())


def test_only_masked_pixels_change_and_stay_in_range() -> None:
    images, foreground = _object_images()
    pseudo = PseudoAnomalyGenerator(patch_size=4, seed=1)(images, foreground)
    changed = (pseudo.images - images).abs().amax(dim=1) > 0
    assert not (changed & (pseudo.masks == 0)).any()
    assert changed.any()
    assert pseudo.images.min() >= 0 and pseudo.images.max() <= 1


def test_default_foreground_is_the_whole_image_and_boxes_respect_size_bounds() -> None:
    images = torch.rand(8, 3, 32, 32)
    pseudo = PseudoAnomalyGenerator(patch_size=4, max_size_fraction=0.5, max_rotation=0.0, seed=0)(images)
    rows = pseudo.masks.any(dim=2).sum(dim=1)
    columns = pseudo.masks.any(dim=1).sum(dim=1)
    assert (rows >= 4).all() and (rows <= 16).all() and (columns >= 4).all() and (columns <= 16).all()


@pytest.mark.parametrize(("background", "value"), [(0.0, 0.7), (0.9, 0.3)], ids=["dark_background", "light_background"])
def test_pseudo_anomalies_go_on_the_object_on_a_dark_or_a_light_background(background: float, value: float) -> None:
    """``on_object`` (RAP's and AGDM's guidance network's pseudo anomalies) pastes on the object that the defect
    makers of the choice of k find, whatever the background's brightness: on a light table the background is not
    foreground (a channel-mean threshold made everything foreground there)."""
    generator = torch.Generator().manual_seed(0)
    _, disc = _object_images(batch=8)
    texture = value + 0.15 * (torch.rand(8, 3, 32, 32, generator=generator) - 0.5)
    images = torch.where(disc[:, None], texture, background + 0.01 * torch.rand(8, 3, 32, 32, generator=generator))
    pasted = PseudoAnomalyGenerator(patch_size=4, seed=0).on_object(images)
    changed = (pasted - images).abs().amax(dim=1) > 0
    assert changed.flatten(1).any(dim=1).all(), "every image gets a pseudo anomaly"
    assert not (changed & ~disc).any(), "only on the object"


def test_tiny_foreground_uses_the_fallback_square() -> None:
    images = torch.rand(2, 3, 32, 32)
    foreground = torch.zeros(2, 32, 32, dtype=torch.bool)
    foreground[:, 10:13, 20:23] = True  # smaller than one min_size box
    pseudo = PseudoAnomalyGenerator(patch_size=4, max_tries=5, seed=0)(images, foreground)
    assert not (pseudo.masks.bool() & ~foreground).any()


def test_seed_makes_generation_reproducible_whatever_the_global_random_state() -> None:
    """``seed`` alone fixes the output: the global generator is advanced, not reseeded, between the two calls (every
    random operation, the colour jitter included, must draw from the generator's own seeded randomness)."""
    images, foreground = _object_images()
    first = PseudoAnomalyGenerator(patch_size=4, seed=3)(images, foreground)
    torch.rand(1000)  # a different global random state for the second call
    second = PseudoAnomalyGenerator(patch_size=4, seed=3)(images, foreground)
    torch.testing.assert_close(first.images, second.images, rtol=0, atol=0)
    torch.testing.assert_close(first.masks, second.masks, rtol=0, atol=0)
    other = PseudoAnomalyGenerator(patch_size=4, seed=4)(images, foreground)
    assert not torch.equal(first.masks, other.masks)
    assert not torch.equal(first.images, other.images)


@pytest.mark.parametrize("level", LEVELS)
def test_every_augmentation_level_keeps_shape_and_range(level: str) -> None:
    generator = PseudoAnomalyGenerator(patch_size=4, seed=0)
    patch = torch.rand(3, 9, 13)
    for _ in range(20):
        augmented = generator.augment(patch, level)
        assert augmented.shape == patch.shape
        assert augmented.min() >= 0 and augmented.max() <= 1


def test_bad_inputs_raise_clear_errors() -> None:
    generator = PseudoAnomalyGenerator(patch_size=4)
    with pytest.raises(
        ValueError, match=r"foreground mask must be \(2, 32, 32\) to match the images, got \(2, 16, 16\)"
    ):
        generator(torch.rand(2, 3, 32, 32), torch.ones(2, 16, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="images must be"):
        generator(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="level_probabilities"):
        PseudoAnomalyGenerator(patch_size=4, level_probabilities=(1.0, 0.0))
    with pytest.raises(ValueError, match="level must be one of"):
        generator.augment(torch.rand(3, 8, 8), "extreme")
