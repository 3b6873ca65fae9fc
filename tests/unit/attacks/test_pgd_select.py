"""PGD's ``select``: best iterate on the objective, final iterate, or auto (final for randomised detectors).

On a randomised detector the objective is a noisy EOT estimate; keeping per sample the iterate with the highest
estimate picks the luckiest draw (the winner's curse), often the clean image itself, while the final iterate of the
gradient ascent is at the optimum.
"""

from collections.abc import Callable

import pytest
import torch

from anomalib_robust.attacks import PGD, DetectorScore

SHAPE = (3, 4, 4)
EPS = 4 / 255


@pytest.fixture
def linear_problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(SHAPE, generator=generator)
    images = 0.3 + 0.4 * torch.rand(64, *SHAPE, generator=generator)
    return weights, images, torch.arange(64) % 2


def _true_gain(
    weights: torch.Tensor, images: torch.Tensor, adversarial: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Noise-free objective gain ``y * <w, adversarial - x>`` per sample."""
    return (1.0 - 2.0 * labels.float()) * ((adversarial - images) * weights).flatten(1).sum(dim=1)


def test_auto_is_final_for_randomised_and_best_for_deterministic(linear_detector: Callable) -> None:
    weights = torch.ones(SHAPE)
    assert PGD(linear_detector(weights)).selection == "best"
    noisy = PGD(linear_detector(weights, noise=1.0), eot_samples=2)
    assert noisy.selection == "final"
    assert noisy.rescore_samples == 8
    assert PGD(linear_detector(weights, noise=1.0), select="best").selection == "best"
    assert "select=final" in repr(noisy)


def test_final_returns_the_last_iterate(linear_detector: Callable, linear_problem: tuple) -> None:
    """From ``x_0 = x`` two steps of ``eps / 4`` in the direction ``y * sign(w)`` of the (noise-free) gradient."""
    weights, images, labels = linear_problem
    detector = linear_detector(weights, noise=10.0)
    attack = PGD(detector, eps=EPS, alpha=EPS / 4, steps=2, random_start=False, select="final", eot_samples=2)
    adversarial = attack(images, labels)
    expected = images + EPS / 2 * (1.0 - 2.0 * labels.float()).view(-1, 1, 1, 1) * weights.sign()
    assert torch.allclose(adversarial, expected, atol=1e-6)
    auto = PGD(detector, eps=EPS, alpha=EPS / 4, steps=2, random_start=False, eot_samples=2)
    assert torch.equal(auto(images, labels), adversarial)


def test_best_on_a_noisy_objective_suffers_the_winners_curse(linear_detector: Callable, linear_problem: tuple) -> None:
    """Noise 100x the attainable gain: "best" keeps whichever point had the luckiest draw, the clean image for some
    samples; "final" reaches the optimum ``eps * ||w||_1`` for every sample."""
    weights, images, labels = linear_problem
    detector = linear_detector(weights, noise=100 * EPS * float(weights.abs().sum()))
    final = PGD(detector, eps=EPS, steps=10, select="final", eot_samples=2)(images, labels)
    best = PGD(detector, eps=EPS, steps=10, select="best", eot_samples=2)(images, labels)
    optimum = EPS * weights.abs().sum()
    assert torch.allclose(_true_gain(weights, images, final, labels), optimum.expand(64), rtol=1e-4)
    clean_kept = (best == images).flatten(1).all(dim=1)
    assert clean_kept.any()
    assert _true_gain(weights, images, best, labels).mean() < 0.9 * optimum


def test_final_with_restarts_is_never_worse_than_one_restart(detector: torch.nn.Module, batch: tuple) -> None:
    """On a deterministic detector the re-scored pick among restart finals includes the single run's final."""
    images, labels = batch
    single = PGD(detector, eps=8 / 255, steps=2, select="final")(images, labels)
    restarted = PGD(detector, eps=8 / 255, steps=2, restarts=3, select="final")(images, labels)
    scorer = DetectorScore(detector)
    with scorer.prepared():
        before, after = scorer.objective(single, labels), scorer.objective(restarted, labels)
    assert (after >= before - 1e-6).all()
    assert (after > before + 1e-6).any()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"select": "last"}, r"select must be one of \('auto', 'best', 'final'\), got 'last'"),
        ({"select": None}, "select must be one of"),
        ({"rescore_samples": 0}, "rescore_samples must be an integer >= 1"),
    ],
)
def test_bad_select_arguments_raise(detector: torch.nn.Module, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PGD(detector, **kwargs)


def test_worst_case_rescores_candidates_of_a_randomised_detector(
    linear_detector: Callable, linear_problem: tuple
) -> None:
    """Choosing between the clean image and the optimum on noise about equal to the gain: one draw each (today's
    ``select="best"`` comparison) keeps the clean image for many samples; the re-scored comparison of
    ``Attack.worst_case`` (4 x eot_samples fresh draws) for far fewer."""
    weights, images, labels = linear_problem
    gain = EPS * float(weights.abs().sum())
    detector = linear_detector(weights, noise=gain)
    optimum = images + EPS * (1.0 - 2.0 * labels.float()).view(-1, 1, 1, 1) * weights.sign()
    attack = PGD(detector, eps=EPS, eot_samples=2)
    single = DetectorScore(detector, eot_samples=1)
    with single.prepared(), attack.detector.prepared():
        torch.manual_seed(0)
        noisy_pick = single.objective(optimum, labels) > single.objective(images, labels)
        chosen = attack.worst_case(images, labels, [optimum])
    rescored_pick = (chosen == optimum).flatten(1).all(dim=1)
    assert (~noisy_pick).float().mean() > 0.15
    assert (~rescored_pick).float().mean() < 0.5 * (~noisy_pick).float().mean()
