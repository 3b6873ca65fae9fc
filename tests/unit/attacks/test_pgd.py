"""PGD L_inf / L_2 (AdvRAD paper, eq. 1-2): constraints, direction, restarts, seeds and bad input."""

import itertools

import pytest
import torch

from anomalib_robust.attacks import PGD, DetectorScore


def _scores(detector: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    scorer = DetectorScore(detector)
    with scorer.prepared():
        return scorer.predict(images)[0]


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_output_is_in_eps_ball_and_box(detector: torch.nn.Module, batch: tuple, norm: str) -> None:
    images, labels = batch
    eps = 8 / 255 if norm == "Linf" else 0.5
    adversarial = PGD(detector, eps=eps, steps=5, norm=norm, alpha=eps)(images, labels)
    delta = (adversarial - images).flatten(1)
    size = delta.abs().amax(dim=1) if norm == "Linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-5).all()
    assert adversarial.min() >= 0 and adversarial.max() <= 1


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_score_moves_in_requested_direction(detector: torch.nn.Module, batch: tuple, norm: str) -> None:
    """Normal samples (y = +1) go up, anomalous ones (y = -1) go down."""
    images, labels = batch
    adversarial = PGD(detector, eps=0.1 if norm == "Linf" else 1.0, steps=5, norm=norm)(images, labels)
    change = _scores(detector, adversarial) - _scores(detector, images)
    assert (change[labels == 0] > 0).all()
    assert (change[labels == 1] < 0).all()


def test_more_steps_never_weaken_the_attack_and_do_strengthen_it(detector: torch.nn.Module, batch: tuple) -> None:
    """Same seed and step size: the run with more steps extends the shorter one, so (best iterate kept) its objective
    is at least as high per sample, and strictly higher somewhere (the extra steps are actually taken)."""
    images, labels = batch
    objective = torch.where(labels == 0, 1.0, -1.0)
    values = [
        objective * _scores(detector, PGD(detector, eps=8 / 255, alpha=0.5 / 255, steps=steps, seed=0)(images, labels))
        for steps in (1, 3, 10)
    ]
    for fewer, more in itertools.pairwise(values):
        assert (more >= fewer - 1e-6).all()
        assert (more > fewer + 1e-6).any()


def test_restarts_never_weaken_the_attack(detector: torch.nn.Module, batch: tuple) -> None:
    images, labels = batch
    objective = torch.where(labels == 0, 1.0, -1.0)
    single = objective * _scores(detector, PGD(detector, eps=4 / 255, steps=3)(images, labels))
    restarted = objective * _scores(detector, PGD(detector, eps=4 / 255, steps=3, restarts=3)(images, labels))
    assert (restarted >= single - 1e-6).all()


def test_paper_start_and_seeded_runs_reproduce(detector: torch.nn.Module, batch: tuple) -> None:
    images, labels = batch
    first = PGD(detector, eps=4 / 255, steps=3, seed=5)(images, labels)
    assert torch.equal(first, PGD(detector, eps=4 / 255, steps=3, seed=5)(images, labels))
    no_start = PGD(detector, eps=4 / 255, steps=1, random_start=False, alpha=1 / 255)(images, labels)
    assert (no_start - images).abs().max() <= 1 / 255 + 1e-6


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eps": 0.0}, "eps must be a finite number > 0"),
        ({"eps": float("nan")}, "eps must be a finite number > 0"),
        ({"eps": float("inf")}, "eps must be a finite number > 0"),
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"norm": "L1"}, "norm must be one of"),
        ({"restarts": 0}, "restarts must be an integer >= 1"),
        ({"eot_samples": 0}, "eot_samples must be a positive integer"),
    ],
)
def test_bad_arguments_raise(detector: torch.nn.Module, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PGD(detector, **kwargs)


def test_step_larger_than_eps_warns(detector: torch.nn.Module) -> None:
    with pytest.warns(UserWarning, match="larger than eps"):
        PGD(detector, eps=1 / 255, alpha=2 / 255)


def test_bad_batches_raise(detector: torch.nn.Module, batch: tuple) -> None:
    images, labels = batch
    attack = PGD(detector, steps=1)
    with pytest.raises(ValueError, match="labels are required"):
        attack(images, None)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        attack(images * 2, labels)


def test_model_without_pred_score_is_rejected(batch: tuple) -> None:
    images, labels = batch
    detector = torch.nn.Module()
    detector.model = torch.nn.Identity()
    with pytest.raises(TypeError, match="pred_score"):
        PGD(detector, steps=1)(images, labels)
    with pytest.raises(TypeError, match="AnomalibModule"):
        PGD(torch.nn.Identity())
