"""APGD and Square keep optimising the ordering of scores (AUROC), however far the scores lie from a threshold.

The old attacks ran torchattacks on two logits ``+-(A - t) / scale``: APGD's cross-entropy is flat (zero gradient)
for samples far on the correct side of ``t``, and Square stops improving a sample once it is past ``t``. Here the
threshold lies far below every score (``|A - t| = 1000 * scale``): normal samples are already past it, anomalous
samples far on the correct side. ``RobustEval`` passes ``threshold`` and ``scale`` through :func:`build_attack`,
which drops settings an attack does not take, as done below.
"""

from collections.abc import Callable

import pytest
import torch
from sklearn.metrics import roc_auc_score

from anomalib_robust.attacks import DetectorScore, Square, build_attack

EPS = 0.1
SHAPE = (3, 16, 16)


@pytest.fixture
def separated_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Normal images around 0.40, anomalous around 0.55: the classes are 1.5 eps apart in the score ``mean(x)``, so
    moving one class by eps keeps AUROC at 1 and only moving both classes can reorder them."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1] * 4)
    base = torch.where(labels == 0, 0.40, 0.55).view(-1, 1, 1, 1)
    return base + 0.005 * (2 * torch.rand(8, *SHAPE, generator=generator) - 1), labels


def _auroc(detector: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    scorer = DetectorScore(detector)
    with scorer.prepared():
        scores = scorer.predict(images)[0]
    return float(roc_auc_score(labels.numpy(), scores.numpy()))


@pytest.mark.parametrize(("name", "settings"), [("apgd", {"steps": 10}), ("square", {"n_queries": 1000})])
def test_auroc_drops_for_samples_far_from_the_threshold(
    linear_detector: Callable,
    separated_batch: tuple,
    name: str,
    settings: dict,
) -> None:
    images, labels = separated_batch
    detector = linear_detector(torch.full(SHAPE, 1 / torch.Size(SHAPE).numel()))  # A(x) = mean(x)
    assert _auroc(detector, images, labels) == 1.0
    attack = build_attack(name, detector, eps=EPS, norm="Linf", threshold=-1000.0, scale=1.0, **settings)
    adversarial = attack(images, labels)
    assert (adversarial - images).abs().max() <= EPS + 1e-6
    assert _auroc(detector, adversarial, labels) < 0.5


def test_square_spends_every_query_on_every_sample(linear_detector: Callable, separated_batch: tuple) -> None:
    """No early stop: ``n_queries`` scores per restart for the whole batch, plus the final worst-case comparison
    (clean image and each restart)."""
    images, labels = separated_batch
    attack = Square(linear_detector(torch.ones(SHAPE)), eps=EPS, n_queries=25, restarts=2)
    calls = []
    objective = attack.detector.objective

    def counting_objective(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return objective(x, y)

    attack.detector.objective = counting_objective
    attack(images, labels)
    assert calls == [images.shape[0]] * (2 * 25 + 1 + 2)
