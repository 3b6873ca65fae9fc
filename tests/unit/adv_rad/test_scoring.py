"""Alg. 4: multi-scale error map, mean filter and deviation from the normal error map, on hand-made maps."""

import pytest
import torch

from anomalib_robust.models.adv_rad.scoring import check_scales, deviation_from_normal, multiscale_error_map


def test_identical_images_have_zero_error() -> None:
    x = torch.rand(2, 3, 16, 16)
    assert multiscale_error_map(x, x.clone()).abs().max().item() == 0


def test_uniform_difference_gives_its_square_at_every_scale() -> None:
    x = torch.zeros(1, 3, 16, 16)
    error = multiscale_error_map(x, x + 0.5)
    torch.testing.assert_close(error, torch.full((1, 1, 16, 16), 0.25))


def test_channel_mean_and_scale_average() -> None:
    """One channel off by 1 on a single pixel: full-res error 1/3 there, coarser scales spread it out."""
    x = torch.zeros(1, 3, 8, 8)
    reconstruction = x.clone()
    reconstruction[0, 0, 3, 3] = 1.0
    error = multiscale_error_map(x, reconstruction, scales=(1.0,), mean_filter_size=1)
    assert error[0, 0, 3, 3].item() == pytest.approx(1 / 3)
    assert error.sum().item() == pytest.approx(1 / 3)
    coarse = multiscale_error_map(x, reconstruction, scales=(0.5,), mean_filter_size=1)
    assert coarse[0, 0, 3, 3].item() == pytest.approx((1 / 4) ** 2 / 3, rel=0.5)


def test_mean_filter_averages_neighbourhood() -> None:
    x = torch.zeros(1, 1, 9, 9)
    reconstruction = x.clone()
    reconstruction[0, 0, 4, 4] = 3.0
    error = multiscale_error_map(x, reconstruction, scales=(1.0,), mean_filter_size=3)
    assert error[0, 0, 4, 4].item() == pytest.approx(1.0)  # 9 / 9
    assert error[0, 0, 3, 3].item() == pytest.approx(1.0)
    assert error[0, 0, 2, 2].item() == 0


def test_deviation_is_max_absolute_difference() -> None:
    error = torch.zeros(2, 1, 4, 4)
    error[0, 0, 1, 1] = 0.7
    error[1, 0, 2, 2] = -0.2  # below the normal map counts too (absolute deviation)
    normal = torch.full((1, 1, 4, 4), 0.1)
    anomaly_map, score = deviation_from_normal(error, normal)
    assert anomaly_map.shape == (2, 1, 4, 4)
    torch.testing.assert_close(score, torch.tensor([0.6, 0.3]))


def test_scales_must_be_powers_of_half_dividing_the_image() -> None:
    check_scales((1, 0.5, 0.25, 0.125), (32, 32))
    with pytest.raises(ValueError, match="powers of 1/2"):
        check_scales((1, 0.3), (32, 32))
    with pytest.raises(ValueError, match="divisible by 8"):
        check_scales((1, 0.125), (36, 36))
