"""``check_gradient``: autograd's directional derivative of the attacked score against central finite differences."""

import pytest
import torch
from anomalib.data import InferenceBatch
from torch import nn

from anomalib_robust.attacks import DetectorScore, NotDifferentiableError
from anomalib_robust.evaluation.gradient_check import GradientCheck, check_gradient


class _ZeroBackward(torch.autograd.Function):
    """Identity forward, zero backward: a masked branch that still ``requires_grad``."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        del ctx
        return x.clone()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        del ctx
        return torch.zeros_like(grad)


class ToyModel(nn.Module):
    """Score = mean squared conv response (under ``torch.no_grad`` like anomalib) + optionally a masked branch."""

    def __init__(self, mask: str | None = None, noise: float = 0.0, float32_only: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.other = nn.Conv2d(3, 4, 3, padding=1)
        self.mask, self.noise, self.float32_only = mask, noise, float32_only
        self.stochastic = bool(noise)

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        if self.float32_only and images.dtype != torch.float32:
            msg = "this model only runs in float32"
            raise RuntimeError(msg)
        with torch.no_grad():  # lifted by unmasked_gradients: an honest gradient
            features = self.conv(images)
        if self.noise:
            features = features + self.noise * torch.randn_like(features)
        score = (features**2).mean(dim=(1, 2, 3))
        branch = torch.tanh(self.other(images)).mean(dim=(1, 2, 3))
        if self.mask == "detach":
            branch = branch.detach()  # this package's (the test's) detach: not lifted
        elif self.mask == "function":
            branch = _ZeroBackward.apply(branch)
        elif self.mask == "everything":
            score = score.detach()
            branch = branch.detach()
        return InferenceBatch(pred_score=score + 3 * branch)


class ToyDetector(nn.Module):
    def __init__(self, **kwargs: object) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.pre_processor = nn.Identity()
        self.model = ToyModel(**kwargs)


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(5, 3, 8, 8, generator=generator)
    images[0, :, :2] = 0.0  # pixels on the box boundary
    images[1, :, -2:] = 1.0
    return images, torch.tensor([0, 1, 0, 1, 0])


def test_honest_gradient_passes_in_float64_and_leaves_no_trace(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = batch
    toy = ToyDetector()
    toy.train()
    detector = DetectorScore(toy)
    parameters = {
        name: (parameter, parameter.data_ptr(), parameter.clone(), parameter.requires_grad)
        for name, parameter in toy.named_parameters()
    }
    rng_state = torch.get_rng_state()
    check = check_gradient(detector, images, labels)
    assert isinstance(check, GradientCheck)
    assert check.passed is True
    assert (check.num_samples, check.num_directions, check.step, check.tolerance) == (4, 2, 1e-3, 0.1)
    assert check.max_relative_error < 1e-6
    assert check.detail.startswith("autograd vs finite differences on 4 images x 2 directions (float64")
    assert "tolerance 10%" in check.detail
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert toy.training
    for name, parameter in toy.named_parameters():
        original, address, value, requires_grad = parameters[name]
        assert parameter is original
        assert parameter.data_ptr() == address  # the original storage, put back
        assert torch.equal(parameter, value)
        assert parameter.dtype == torch.float32
        assert parameter.requires_grad == requires_grad
        assert parameter.grad is None
    assert images.grad is None


@pytest.mark.parametrize("mask", ["detach", "function"])
def test_masked_branch_fails(batch: tuple[torch.Tensor, torch.Tensor], mask: str) -> None:
    """The score still requires grad (the other branch is honest), so only the finite differences can tell."""
    detector = DetectorScore(ToyDetector(mask=mask))
    with detector.prepared():
        check = check_gradient(detector, *batch)
    assert check.passed is False
    assert check.max_relative_error > 0.5
    assert "masked" in check.detail


def test_stochastic_detector_passes_with_common_random_numbers(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    detector = DetectorScore(ToyDetector(noise=0.5))
    assert detector.stochastic
    assert detector.eot_samples > 1  # the check uses one draw, not the EOT budget
    rng_state = torch.get_rng_state()
    check = check_gradient(detector, *batch, num_samples=3, num_directions=3, seed=7)
    assert check.passed is True
    assert check.max_relative_error < 1e-6
    assert check.num_samples == 3
    assert torch.equal(torch.get_rng_state(), rng_state)


def test_model_without_float64_is_checked_in_float32_with_a_larger_step(
    batch: tuple[torch.Tensor, torch.Tensor],
) -> None:
    toy = ToyDetector(float32_only=True)
    check = check_gradient(DetectorScore(toy), *batch, step=1e-3)
    assert check.passed is True
    assert check.step == 1e-2
    assert "float32" in check.detail
    assert all(parameter.dtype == torch.float32 for parameter in toy.parameters())


def test_score_without_any_gradient_raises(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    with pytest.raises(NotDifferentiableError):
        check_gradient(DetectorScore(ToyDetector(mask="everything")), *batch)


def test_no_images_cannot_be_evaluated() -> None:
    check = check_gradient(DetectorScore(ToyDetector()), torch.rand(0, 3, 8, 8), torch.zeros(0))
    assert check.passed is None
    assert check.num_samples == 0
