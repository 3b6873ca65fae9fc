"""Pseudo anomalies depend on the generator's seed only (not torch's global RNG), drawn on the images' device; the
swirl is scikit-image's."""

import math

import pytest
import torch

from anomalib_robust.models.patch_guard.pseudo_anomaly import LEVELS, PseudoAnomalyGenerator, _swirl


def _generate(
    seed: int, global_seed: int, level_probabilities: tuple[float, float, float], device: str | torch.device = "cpu"
) -> torch.Tensor:
    torch.manual_seed(global_seed)
    images = torch.rand(12, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    generator = PseudoAnomalyGenerator(patch_size=4, level_probabilities=level_probabilities, seed=seed)
    return generator(images).images


@pytest.mark.parametrize("level", LEVELS)
def test_same_seed_gives_the_same_anomalies_whatever_the_global_rng(level: str, device: torch.device) -> None:
    probabilities = tuple(float(name == level) for name in LEVELS)
    first = _generate(seed=5, global_seed=0, level_probabilities=probabilities, device=device)
    second = _generate(seed=5, global_seed=123, level_probabilities=probabilities, device=device)
    assert first.device.type == device.type
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_tensor_draws_use_one_seeded_generator_on_the_images_device(generator_devices: list) -> None:
    """The heavy level draws noise and erased colours: from one generator, made for the images' device (a CPU
    generator cannot draw on a GPU), seeded with the generator's seed."""
    images = torch.rand(4, 3, 32, 32)
    generator = PseudoAnomalyGenerator(patch_size=4, level_probabilities=(0.0, 0.0, 1.0), seed=5)
    generator(images)
    assert generator_devices == [images.device]
    assert generator.generator(images.device).initial_seed() == 5


def test_augmentations_draw_nothing_from_the_global_rng() -> None:
    generator = PseudoAnomalyGenerator(patch_size=4, seed=0)
    patch = torch.rand(3, 12, 12)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    for _ in range(30):
        for level in LEVELS:
            generator.augment(patch, level)
    assert torch.equal(torch.get_rng_state(), state)


def test_different_seeds_give_different_anomalies() -> None:
    first = _generate(seed=5, global_seed=0, level_probabilities=(0.2, 0.2, 0.6))
    second = _generate(seed=6, global_seed=0, level_probabilities=(0.2, 0.2, 0.6))
    assert not torch.equal(first, second)


def test_swirl_rotates_the_centre_and_leaves_pixels_beyond_the_radius_unchanged() -> None:
    """On an image of its own pixel coordinates the swirl's output is the source position of every pixel."""
    size, strength = 33, 2.0
    coordinates = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    y, x = torch.meshgrid(coordinates, coordinates, indexing="ij")
    source = _swirl(torch.stack([x, y]), strength)
    rho = torch.sqrt(x**2 + y**2)
    displacement = torch.sqrt((source[0] - x) ** 2 + (source[1] - y) ** 2)
    assert displacement[rho >= size / 2].max() < 0.05
    near_centre = (rho > 1.5) & (rho < 2.5)
    angle = torch.atan2(source[1], source[0]) - torch.atan2(y, x)
    angle = torch.remainder(angle + math.pi, 2 * math.pi) - math.pi
    # scikit-image: theta = strength * exp(-rho / (radius ln 2 / 5)), about 0.84 rad at rho = 2, radius = 16.5
    expected = strength * torch.exp(-rho / (size / 2 * math.log(2) / 5))
    torch.testing.assert_close(angle[near_centre], expected[near_centre], atol=0.05, rtol=0)
    assert angle[near_centre].min() > 0.5
