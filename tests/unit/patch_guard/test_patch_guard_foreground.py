"""Foreground estimators: all-ones, the background-difference heuristic, and Grad-CAM of a given classifier."""

import pytest
import torch
from torch import nn

from anomalib_robust.models.patch_guard.foreground import ForegroundEstimator, dilate, otsu_threshold


def _square_on_black(batch: int = 2, size: int = 32) -> torch.Tensor:
    images = torch.zeros(batch, 3, size, size)
    images[:, :, 8:24, 10:26] = 0.6 + 0.1 * torch.rand(batch, 3, 16, 16)
    return images


def test_all_mode_is_all_ones() -> None:
    mask = ForegroundEstimator("all")(torch.rand(2, 3, 8, 8))
    assert mask.dtype == torch.bool and mask.shape == (2, 8, 8) and mask.all()


def test_heuristic_finds_the_object_and_dilation_grows_it() -> None:
    images = _square_on_black()
    mask = ForegroundEstimator("heuristic")(images)
    expected = torch.zeros(2, 32, 32, dtype=torch.bool)
    expected[:, 8:24, 10:26] = True
    assert torch.equal(mask, expected)
    dilated = ForegroundEstimator("heuristic", dilation_iterations=2)(images)
    assert dilated[:, 6:26, 8:28].all() and dilated.sum() == 2 * 20 * 20


def test_heuristic_falls_back_to_all_ones_on_a_flat_image() -> None:
    assert ForegroundEstimator("heuristic")(torch.full((1, 3, 16, 16), 0.5)).all()


def test_otsu_separates_two_modes() -> None:
    values = torch.cat([torch.full((1, 50), 0.1), torch.full((1, 50), 0.9)], dim=1)
    assert 0.1 < otsu_threshold(values).item() < 0.9


def test_dilate_single_pixel() -> None:
    mask = torch.zeros(1, 7, 7, dtype=torch.bool)
    mask[0, 3, 3] = True
    assert dilate(mask, 1).sum() == 9 and dilate(mask, 2).sum() == 25


class _SpotClassifier(nn.Module):
    """Convolutional 'classifier' whose class-0 evidence is the image brightness, so Grad-CAM highlights the object."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 4, kernel_size=3, padding=1)
        nn.init.constant_(self.features.weight, 1 / 27)
        nn.init.zeros_(self.features.bias)
        self.head = nn.Linear(4, 2)
        nn.init.constant_(self.head.weight, 1.0)
        with torch.no_grad():
            self.head.weight[1] = -1.0
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.features(images)).mean(dim=(2, 3)))


def test_gradcam_highlights_the_object(generator_devices: list) -> None:
    """Needs the ``gradcam`` extra (``grad-cam``, also in the ``test`` extra). The second view's soft augmentation is
    drawn by a generator on the images' device."""
    classifier = _SpotClassifier()
    estimator = ForegroundEstimator("gradcam", classifier=classifier, target_layers=[classifier.features], num_views=2)
    images = _square_on_black()
    mask = estimator(images)
    assert mask.shape == (2, 32, 32)
    assert mask[:, 10:22, 12:24].all()
    assert not mask[:, :4, :4].any()
    assert generator_devices == [images.device]


def test_bad_arguments_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="foreground mode must be one of"):
        ForegroundEstimator("otsu")
    with pytest.raises(ValueError, match="needs a classifier"):
        ForegroundEstimator("gradcam")
    with pytest.raises(ValueError, match="dilation_iterations"):
        ForegroundEstimator("all", dilation_iterations=-1)
