"""AdvRAD's input gradient flows through the reconstruction, not only through the input term of the error map."""

import pytest
import torch
from torch import nn

from anomalib_robust.attacks import DetectorScore
from anomalib_robust.evaluation.gradient_check import check_gradient
from anomalib_robust.models.adv_rad import torch_model
from anomalib_robust.models.adv_rad.torch_model import AdvRADModel


class Detector(nn.Module):
    """Stands in for the ``AdvRAD`` lightning module: the torch model in ``.model``, no pre-processing."""

    def __init__(self, model: AdvRADModel) -> None:
        super().__init__()
        self.model = model


@pytest.fixture
def model(tiny_advrad: dict) -> AdvRADModel:
    """A random-init tiny AdvRAD, "fitted" on its own error maps of a few images (as ``AdvRAD.fit`` computes them)."""
    torch.manual_seed(0)
    model = AdvRADModel(**tiny_advrad).eval()
    with torch.no_grad():
        model.set_normal_error_map(model.error_map(torch.rand(4, 3, 32, 32)).mean(0))
    return model


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _detach_reconstruction(monkeypatch: pytest.MonkeyPatch) -> None:
    """Alg. 1 as the torch model looks it up, with its output cut from the graph (the reconstruction branch masked)."""
    one_shot = torch_model.one_shot
    monkeypatch.setattr(torch_model, "one_shot", lambda *args, **kwargs: one_shot(*args, **kwargs).detach())


@pytest.fixture
def detached_reconstruction(monkeypatch: pytest.MonkeyPatch) -> None:
    _detach_reconstruction(monkeypatch)


def _input_gradient(model: AdvRADModel, images: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(3)  # the same diffusion noise for every call
    x = images.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(model(x).pred_score.sum(), x)
    return gradient


def test_gradient_flows_through_the_reconstruction(
    model: AdvRADModel, images: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    honest = _input_gradient(model, images)
    assert torch.equal(_input_gradient(model, images), honest)  # common noise: the comparison is not noise
    _detach_reconstruction(monkeypatch)
    detached = _input_gradient(model, images)
    assert ((honest - detached).norm() / honest.norm()).item() > 0.01


def test_gradient_check_passes_on_the_honest_model(model: AdvRADModel, images: torch.Tensor) -> None:
    check = check_gradient(DetectorScore(Detector(model)), images, torch.tensor([0, 1]), eps=2 / 255)
    assert check.finite_difference.passed is True, check.finite_difference.detail
    assert check.attack_step.passed is True, check.attack_step.detail
    assert "float64" in check.finite_difference.detail
    assert all(parameter.dtype == torch.float32 and parameter.grad is None for parameter in model.parameters())
    assert model.normal_error_map.dtype == torch.float32


@pytest.mark.usefixtures("detached_reconstruction")
def test_gradient_check_fails_with_the_reconstruction_detached(model: AdvRADModel, images: torch.Tensor) -> None:
    """The score still requires grad (the input term), so only the finite differences see the masked branch."""
    check = check_gradient(DetectorScore(Detector(model)), images, torch.tensor([0, 1]), eps=2 / 255)
    assert check.finite_difference.passed is False, check.finite_difference.detail
