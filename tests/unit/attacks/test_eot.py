"""EOT (AdvRAD paper, sec. 5.6): mean of single-draw gradients for the attacker, needed on randomised detectors."""

import torch

from anomalib_robust.attacks import PGD, DetectorScore, unmasked_gradients
from anomalib_robust.attacks.objective import attack_objective


def test_eot_gradient_is_mean_of_single_draw_gradients(stochastic_detector: torch.nn.Module, batch: tuple) -> None:
    images, labels = batch
    scorer = DetectorScore(stochastic_detector, eot_samples=4)
    with scorer.prepared():
        torch.manual_seed(3)
        value, gradient = scorer.objective_and_gradient(images, labels)
        torch.manual_seed(3)
        singles = []
        for _ in range(4):
            x = images.clone().requires_grad_(True)
            with unmasked_gradients():
                singles.append(torch.autograd.grad(attack_objective(scorer.single_draw(x)[0], labels).sum(), x)[0])
    assert torch.allclose(gradient, torch.stack(singles).mean(dim=0), atol=1e-6)
    assert value.shape == (images.shape[0],)


def test_randomised_detector_gets_eot_by_default(stochastic_detector: torch.nn.Module, batch: tuple) -> None:
    attack = PGD(stochastic_detector, steps=1)
    assert attack.detector.stochastic
    assert attack.detector.eot_samples == 8
    assert attack.label == "EOT-PGD"
    images, labels = batch
    assert torch.equal(attack(images, labels), attack(images, labels))


def test_deterministic_detector_is_never_drawn_twice(detector: torch.nn.Module, batch: tuple) -> None:
    """An EOT budget is for randomised detectors: a deterministic one's draws are all equal, so it gets one."""
    scorer = DetectorScore(detector, eot_samples=20)
    assert not scorer.stochastic and scorer.eot_samples == 1
    images, labels = batch
    calls = []
    handle = detector.model.register_forward_hook(lambda _module, inputs, _output: calls.append(inputs[0].shape[0]))
    try:
        with scorer.prepared():
            scorer.objective_and_gradient(images, labels)
    finally:
        handle.remove()
    assert calls == [images.shape[0]]
    assert PGD(detector, steps=1, eot_samples=20).label == "PGD"


def test_prediction_is_one_deployed_draw_not_the_eot_mean(stochastic_detector: torch.nn.Module, batch: tuple) -> None:
    """EOT is the attacker's tool: ``predict`` scores as deployed (one forward pass), whatever ``eot_samples`` is."""
    images, _ = batch
    scorer = DetectorScore(stochastic_detector, eot_samples=16)
    with scorer.prepared():
        torch.manual_seed(0)
        predicted = scorer.predict(images)[0]
        torch.manual_seed(0)
        draws = torch.stack([scorer.single_draw(images)[0] for _ in range(16)])
    assert torch.equal(predicted, draws[0])
    assert not torch.allclose(predicted, draws.mean(dim=0))
