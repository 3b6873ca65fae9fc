"""BPDA (AdvRAD paper, sec. 5.5) and the error for scores that stay non-differentiable."""

import pytest
import torch

from anomalib_robust.attacks import BPDA, PGD, NotDifferentiableError


class Quantise(torch.nn.Module):
    """A stage outside autograd (8-bit rounding through numpy)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy((x.detach().numpy() * 255).round() / 255)


def test_forward_is_exact_and_backward_uses_the_surrogate() -> None:
    x = torch.rand(2, 3, requires_grad=True)
    identity = BPDA(Quantise())
    assert torch.equal(identity(x), Quantise()(x))
    assert torch.equal(torch.autograd.grad(identity(x).sum(), x)[0], torch.ones_like(x))
    doubled = BPDA(Quantise(), surrogate=lambda t: 2 * t)
    assert torch.equal(torch.autograd.grad(doubled(x).sum(), x)[0], torch.full_like(x, 2.0))
    with pytest.raises(ValueError, match="surrogate must match"):
        BPDA(lambda t: t.sum(dim=1))(x)


def test_non_differentiable_detector_raises_then_bpda_attacks_it(detector: torch.nn.Module, batch: tuple) -> None:
    images, labels = batch
    detector.pre_processor = Quantise()
    with pytest.raises(NotDifferentiableError, match=r"ToyDetector.*BPDA.*Square"):
        PGD(detector, steps=1)(images, labels)
    adversarial = PGD(detector, eps=8 / 255, steps=2, bpda={"pre_processor": None})(images, labels)
    assert not torch.equal(adversarial, images)
    assert isinstance(detector.pre_processor, Quantise)
    with pytest.raises(ValueError, match=r"no submodule 'model\.missing'"):
        PGD(detector, bpda={"model.missing": None})
