"""BPDA (AdvRAD paper, sec. 5.5) and the error for scores that stay non-differentiable."""

import pytest
import torch

from anomalib_robust.attacks import BPDA, PGD, DetectorScore, NotDifferentiableError


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


class Scale(torch.nn.Module):
    """A stage that multiplies its input, counting its calls."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor, self.calls = factor, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.factor * x


def test_a_surrogate_stage_gives_the_gradient_and_the_real_stage_the_scores(linear_detector, batch: tuple) -> None:
    """The surrogate process of Lee & Kim: the attack's gradient steps run the surrogate, scoring runs the real stage,
    and the model is left as found."""
    images, labels = batch
    detector = linear_detector(torch.ones(3, 8, 8))
    real, surrogate = Scale(1.0), Scale(-3.0)
    detector.pre_processor = real
    score = DetectorScore(detector, surrogates={"pre_processor": surrogate})
    with score.prepared():
        _, gradient = score.objective_and_gradient(images, labels)
        assert surrogate.calls == 1 and real.calls == 0
        scores, _ = score.predict(images)
    signs = torch.where(labels.bool(), -1.0, 1.0).view(-1, 1, 1, 1)  # y = +1 normal, -1 anomalous
    torch.testing.assert_close(gradient, -3.0 * signs.expand_as(images))
    torch.testing.assert_close(scores, images.flatten(1).sum(dim=1))
    assert real.calls == 1 and detector.pre_processor is real
    assert PGD(score).label == "Surrogate+PGD"
    with pytest.raises(ValueError, match=r"surrogates: .* no submodule 'model\.missing'"):
        DetectorScore(detector, surrogates={"model.missing": surrogate})
